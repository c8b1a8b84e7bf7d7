-- Reasoning without a clean end: no answer after it, or <think>/</think> tags left in the reasoning or the
-- answer (a second think block, a stray tag) that would teach the student a broken format.
SELECT trace_id FROM signals WHERE error IS NULL AND has_reasoning AND NOT think_closed
