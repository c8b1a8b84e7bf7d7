-- The trace switches language: too many letters in scripts the prompt does not use (quality.language_mixing).
-- Variables: max_language_mixing (0..1; null turns the rule off).
SELECT trace_id FROM signals WHERE language_mixing > getvariable('max_language_mixing')
