-- Not verified correct: wrong, timeout, grader error, no answer. Unverifiable traces (the problem has no
-- gold answer or tests) are kept unless drop_unverifiable is true.
-- Variables: drop_unverifiable (boolean).
SELECT trace_id FROM signals
WHERE error IS NULL AND verdict <> 'correct' AND (verdict <> 'unverifiable' OR getvariable('drop_unverifiable'))
