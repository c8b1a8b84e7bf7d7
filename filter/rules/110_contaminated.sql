-- The problem shares a word n-gram with an evaluation benchmark (contamination): training on it would
-- inflate that benchmark's score. The matched benchmark and n-gram are in signals.
SELECT trace_id FROM signals WHERE contaminated
