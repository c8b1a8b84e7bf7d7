-- No chain of thought: a reasoning-distillation set teaches the reasoning, so a bare answer is not kept.
SELECT trace_id FROM signals WHERE error IS NULL AND NOT has_reasoning
