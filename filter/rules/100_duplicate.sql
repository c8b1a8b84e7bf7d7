-- The problem is an exact or near duplicate of another one (dup_problems); only the representative's
-- traces are kept, so no problem is trained on twice under two ids.
SELECT trace_id FROM signals WHERE duplicate
