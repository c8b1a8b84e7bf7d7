-- The teacher was unsure of its own tokens (only traces with logprobs; the others have NULL confidences).
-- Variables: min_mean_logprob, min_token_logprob, max_mean_entropy (each null = that check off).
SELECT trace_id FROM signals
WHERE mean_logprob < getvariable('min_mean_logprob')
   OR min_logprob < getvariable('min_token_logprob')
   OR mean_entropy > getvariable('max_mean_entropy')
