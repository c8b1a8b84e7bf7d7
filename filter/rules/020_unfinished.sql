-- The teacher stopped for another reason than its end of turn: length (max_tokens), repetition,
-- content filter... The answer is cut or missing.
SELECT trace_id FROM signals WHERE error IS NULL AND finish_reason IS DISTINCT FROM 'stop'
