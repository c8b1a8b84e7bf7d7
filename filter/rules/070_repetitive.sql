-- The trace loops: too many of its word n-grams repeat an earlier one (quality.repetition).
-- Variables: max_repetition (0..1; null turns the rule off).
SELECT trace_id FROM signals WHERE repetition > getvariable('max_repetition')
