-- The teacher request failed after its retries (tracegen's `error`): there is nothing to train on.
-- A rule file is one SELECT of the trace_ids to reject; its file name (minus the order prefix) is the reason.
-- It reads the `signals` view (every trace with every label); thresholds are config fields, read with
-- getvariable('<field>') (a field set to null reads NULL, and a comparison with NULL rejects nothing).
SELECT trace_id FROM signals WHERE error IS NOT NULL
