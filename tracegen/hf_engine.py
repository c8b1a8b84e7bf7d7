"""The Hugging Face engine: `generate` in this process, for CPUs and for checkpoints vLLM cannot load
(e.g. a LoRA adapter, applied with PEFT without merging).

Batched (left padding), sampled with temperature/top_p, n samples per prompt, stops on EOS. With
top_logprobs, logprobs come from the raw logits (before temperature and top_p), as vLLM reports them, and the
mass outside the top-k (`rest_logprobs`) is summed over the other tokens, exactly.
"""

import logging
import time

from tracegen.records import Response, Sample, split_reasoning

log = logging.getLogger(__name__)


class HfEngine:
    def __init__(self, cfg):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.cfg, self.torch = cfg, torch
        self.tokenizer = AutoTokenizer.from_pretrained(cfg.adapter or cfg.model)
        self.tokenizer.padding_side = "left"  # generation appends on the right
        kwargs = dict(cfg.engine_kwargs or {})
        kwargs.setdefault("dtype", "auto")
        model = AutoModelForCausalLM.from_pretrained(cfg.model, **kwargs)
        if cfg.adapter:
            from peft import PeftModel

            model = PeftModel.from_pretrained(model, cfg.adapter)
        self.model = model.eval()
        self.eos = _eos_ids(self.model, self.tokenizer)
        if cfg.seed is not None:
            torch.manual_seed(cfg.seed)

    def generate_batch(self, requests: list[tuple[list[dict], int]]) -> list[Response]:
        """One forward batch for many prompts; every prompt gets its own n samples."""
        start = time.monotonic()
        texts = [self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True,
                                                    **(self.cfg.chat_template_kwargs or {}))
                 for messages, _ in requests]
        counts = [n for _, n in requests]
        # generate() takes one num_return_sequences; repeating each prompt n times allows mixed n
        repeated = [t for t, n in zip(texts, counts, strict=True) for _ in range(n)]
        batch = self.tokenizer(repeated, return_tensors="pt", padding=True, add_special_tokens=False)
        batch = batch.to(self.model.device)  # a model loaded onto a GPU (engine_kwargs {device_map: cuda})
        with self.torch.no_grad():
            out = self.model.generate(
                **batch, do_sample=self.cfg.temperature > 0, temperature=self.cfg.temperature or None,
                top_p=self.cfg.top_p, top_k=0, max_new_tokens=self.cfg.max_tokens, eos_token_id=self.eos,
                pad_token_id=self.tokenizer.pad_token_id, return_dict_in_generate=True,
                output_logits=self.cfg.top_logprobs > 0)
        prompt_len = batch["input_ids"].shape[1]
        samples = [self._sample(out, row, prompt_len) for row in range(len(repeated))]
        latency = time.monotonic() - start
        responses, row = [], 0
        for text, n in zip(texts, counts, strict=True):
            prompt_ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
            responses.append(Response(samples=samples[row:row + n], model=self.cfg.model, prompt_tokens=len(prompt_ids),
                                      prompt_token_ids=prompt_ids, latency_s=latency, attempts=1))
            row += n
        return responses

    def _sample(self, out, row: int, prompt_len: int) -> Sample:
        ids = out.sequences[row, prompt_len:].tolist()
        stop = next((i for i, t in enumerate(ids) if t in self.eos), None)
        ids = ids[: stop + 1] if stop is not None else ids  # the EOS is a sampled token: keep it (vLLM does)
        text = self.tokenizer.decode(ids, skip_special_tokens=True)
        reasoning, content, source = split_reasoning({"content": text})
        sample = Sample(reasoning=reasoning, content=content, reasoning_source=source,
                        finish_reason="stop" if stop is not None else "length", completion_tokens=len(ids),
                        token_ids=ids)
        if self.cfg.top_logprobs:
            k = self.cfg.top_logprobs
            logits = self.torch.stack([step[row] for step in out.logits[: len(ids)]]).float()
            logprobs = self.torch.log_softmax(logits, dim=-1)
            top = logprobs.topk(k, dim=-1)
            sampled = self.torch.tensor(ids, device=logprobs.device)
            sample.logprobs = logprobs.gather(1, sampled.unsqueeze(1)).squeeze(1).tolist()
            sample.top_ids, sample.top_logprobs = top.indices.tolist(), top.values.tolist()
            # the mass outside the top-k summed over those tokens themselves: exact even when it is 1e-30
            sample.rest_logprobs = logprobs.scatter(1, top.indices, -float("inf")).logsumexp(-1).tolist()
        return sample


def _eos_ids(model, tokenizer) -> list[int]:
    eos = model.generation_config.eos_token_id if model.generation_config else None
    eos = eos if eos is not None else tokenizer.eos_token_id
    return list(eos) if isinstance(eos, list | tuple) else [eos]
