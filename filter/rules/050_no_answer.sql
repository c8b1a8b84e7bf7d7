-- No answer to check: an empty answer part, or one the grader found no final answer / code block in.
SELECT trace_id FROM signals WHERE error IS NULL AND (NOT has_answer OR verdict = 'no_answer')
