"""Logit-level knowledge distillation for the sft stage: `kd: sparse` (stored teacher top-k) and `kd: online`.

Both optimise, on the completion tokens of the curated traces,

    loss = (alpha * CE + (1 - alpha) * T^2 * D(teacher || student)) summed over tokens / num_items_in_batch

where num_items_in_batch is the number of completion tokens of the whole accumulated batch (transformers counts
it before the accumulation steps), so 8x1 and 2x4 accumulation give the same gradients. CE is at temperature 1.

kd: sparse (`SparseKDTrainer` on `prepare_kd_dataset`'s output) -- D is the forward KL over K+1 outcomes: the
teacher's stored top-k ids plus one "rest" bucket with the mass the top-k leaves out. The student is mapped to the
same outcomes (its probabilities of those ids and 1 - their sum, the latter as a logsumexp over the other ids, so
a near-empty bucket stays exact). Temperature T != 1 is applied to the K+1-outcome distributions of BOTH models
(log_softmax(logp / T) over the outcomes): the teacher's per-token mass inside the bucket is unknown, and tempering
both sides the same way keeps D = 0 when the student equals the teacher, at every T.
The loss runs in chunks of `kd_chunk_size` positions straight from the final hidden states and the LM head weight,
in a custom autograd function that computes the gradient while the chunk's logits exist, so neither the [B, T, V]
logits nor a per-chunk autograd graph is ever kept (tests/bench/bench_kd.py measures the memory).

kd: online (`build_online_kd_trainer`) -- a local teacher model runs a no-grad forward on the same batch and D is
the full-vocabulary forward KL, reverse KL or generalized JSD(beta), computed by TRL's chunked divergence kernel
(`trl.kernels.chunked_divergence`, the one behind TRL's DistillationTrainer) from both models' hidden states.
This is supervised (off-policy) KD on the curated teacher traces, the DeepSeek-R1 distillation setting; TRL's
on-policy DistillationTrainer needs a prompt-only dataset, its own config and student generation in the loop,
so it is not wrapped here.
"""

import logging
import math

import torch
from accelerate.utils import is_peft_model
from trl import SFTTrainer
from trl.kernels.chunked_divergence import ChunkedDivergenceFunction

from sft.kd_data import KD_COLUMNS, KDCollator, prepare_kd_dataset  # noqa: F401  (the sft stage imports them here)

log = logging.getLogger(__name__)

DIVERGENCE_BETA = {"forward": 0.0, "reverse": 1.0}  # TRL's generalized-JSD beta for the two KLs


# ---------------------------------------------------------------------------------------- tokenizer check
def check_same_tokenizer(student_tokenizer, teacher, name: str = "teacher_model") -> None:
    """Refuse a student whose vocabulary (token -> id) or special tokens differ from the teacher's: KD compares
    distributions id by id. `teacher` is a tokenizer or a path/name AutoTokenizer can load."""
    if isinstance(teacher, str) or hasattr(teacher, "__fspath__"):
        from transformers import AutoTokenizer

        teacher = AutoTokenizer.from_pretrained(str(teacher))
    student_vocab, teacher_vocab = student_tokenizer.get_vocab(), teacher.get_vocab()
    problems = []
    if student_vocab != teacher_vocab:
        differ = sorted((t for t in student_vocab.keys() & teacher_vocab.keys() if student_vocab[t] != teacher_vocab[t]),
                        key=student_vocab.get)
        only_student = sorted(student_vocab.keys() - teacher_vocab.keys(), key=student_vocab.get)
        only_teacher = sorted(teacher_vocab.keys() - student_vocab.keys(), key=teacher_vocab.get)
        problems.append(f"vocabularies differ (student {len(student_vocab)} tokens, teacher {len(teacher_vocab)})")
        if differ:
            problems.append(f"{len(differ)} tokens have other ids, e.g. "
                            + ", ".join(f"{t!r}: {student_vocab[t]} vs {teacher_vocab[t]}" for t in differ[:5]))
        if only_student:
            problems.append(f"{len(only_student)} only in the student, e.g. {only_student[:5]}")
        if only_teacher:
            problems.append(f"{len(only_teacher)} only in the teacher, e.g. {only_teacher[:5]}")
    student_special, teacher_special = _special_tokens(student_tokenizer), _special_tokens(teacher)
    if student_special != teacher_special:
        problems.append(f"special tokens differ: student {student_special}, teacher {teacher_special}")
    if problems:
        raise ValueError(f"{name}: the student's tokenizer is not the teacher's ({teacher.name_or_path}), so its "
                         "token ids do not name the teacher's tokens: " + "; ".join(problems)
                         + ". Logit KD needs a student from the teacher's tokenizer family (or kd: none).")


def _special_tokens(tokenizer) -> dict[str, int]:
    return {t.content: i for i, t in tokenizer.added_tokens_decoder.items() if t.special}


# ---------------------------------------------------------------------------------------- the sparse loss
def sparse_kd_loss(hidden, weight, bias, labels, top_ids, top_logprobs, alpha: float, temperature: float,
                   chunk_size: int):
    """Sums over the completion positions: (alpha * CE + (1 - alpha) * T^2 * KL, CE, KL, token count).

    hidden [B, T, H] final hidden states; weight/bias the LM head; labels [B, T] (-100 off the completion);
    top_ids/top_logprobs [B, T, K] the teacher's top-k for the token at each position (-1 / -inf pads), or None
    (K = 0) for CE alone. Position t-1 predicts the token at t, hence the shift."""
    mask = labels[:, 1:] != -100
    h = hidden[:, :-1][mask]
    target = labels[:, 1:][mask]
    if top_ids is None:
        ids = target.new_empty((len(target), 0))
        logprobs = h.new_empty((len(target), 0), dtype=torch.float32)
    else:
        ids, logprobs = top_ids[:, 1:][mask], top_logprobs[:, 1:][mask].float()
    loss, ce, kl = _SparseKD.apply(h, weight, bias, target, ids, logprobs, alpha, temperature, chunk_size)
    return loss, ce, kl, mask.sum()


def _log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x <= 0, accurate on both sides of -log 2 (Maechler 2012)."""
    x = x.clamp(max=0.0)
    return torch.where(x > -math.log(2), torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def _logits(h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    if h.is_cuda and h.dtype in (torch.bfloat16, torch.float16):  # fp32 logits from half inputs, no fp32 copy of W
        z = torch.mm(h, weight.t(), out_dtype=torch.float32)
    else:
        z = torch.mm(h.float(), weight.float().t())
    return z if bias is None else z.add_(bias.float())


class _SparseKD(torch.autograd.Function):
    """Chunked CE + sparse KL with the gradient taken in the forward pass (the chunk's logits are reused for it,
    then freed); backward only scales the stored gradients by the incoming one.

    Per position, with z the logits, q = softmax(z), u the student's K+1 log-probs, p_s / p_t the tempered K+1
    distributions and a = T^2 * dKL/du = T * (p_s - p_t) (sum a = 0, which cancels the -q terms of du/dz):
        dLoss/dz_v = alpha * (q_v - [v = label]) + (1 - alpha) * (a_j if v is top-k entry j else a_rest * r_v)
    where r = softmax over the ids outside the top-k."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, target, top_ids, top_logprobs, alpha, temperature, chunk_size):
        n = hidden.shape[0]
        want_h, want_w, want_b = ctx.needs_input_grad[:3]
        grad_h = torch.zeros(hidden.shape, dtype=torch.float32, device=hidden.device) if want_h else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if want_w else None
        grad_b = torch.zeros(bias.shape, dtype=torch.float32, device=bias.device) if want_b else None
        ce_sum = hidden.new_zeros((), dtype=torch.float32)
        kl_sum = hidden.new_zeros((), dtype=torch.float32)
        with torch.autocast(hidden.device.type, enabled=False):
            for start in range(0, n, chunk_size):
                sl = slice(start, min(start + chunk_size, n))
                h = hidden[sl]
                ce, kl, g = _chunk(_logits(h, weight, bias), target[sl], top_ids[sl], top_logprobs[sl],
                                   alpha, temperature)
                ce_sum += ce.sum()
                kl_sum += kl.sum()
                g_in = g.to(weight.dtype)
                if grad_h is not None:
                    grad_h[sl] = g_in @ weight
                if grad_w is not None:
                    grad_w.addmm_(g.t(), h.float())
                if grad_b is not None:
                    grad_b += g.sum(0)
        ctx.grads = (grad_h, grad_w, grad_b)
        ctx.dtypes = (hidden.dtype, weight.dtype, None if bias is None else bias.dtype)
        loss = alpha * ce_sum + (1 - alpha) * temperature**2 * kl_sum
        ctx.mark_non_differentiable(ce_sum, kl_sum)
        return loss, ce_sum, kl_sum

    @staticmethod
    def backward(ctx, grad_loss, _ce, _kl):
        grads = tuple(None if g is None else (g * grad_loss).to(dtype)
                      for g, dtype in zip(ctx.grads, ctx.dtypes, strict=True))
        ctx.grads = None
        return (*grads, None, None, None, None, None, None)


def _chunk(z, target, top_ids, top_logprobs, alpha: float, temperature: float):
    """Per-position CE and KL of one chunk, and dLoss/dz [c, V] (written into z's memory)."""
    lse = torch.logsumexp(z, dim=-1)
    ce = lse - z.gather(1, target[:, None]).squeeze(1)
    if top_ids.shape[1] == 0:
        kl = torch.zeros_like(ce)
        g = z.sub_(lse[:, None]).exp_().mul_(alpha)
    else:
        valid = (top_ids >= 0) & torch.isfinite(top_logprobs)
        any_valid_id = top_ids.amax(dim=1, keepdim=True).clamp(min=0)  # pads point at a real entry of the row
        ids = torch.where(valid, top_ids, any_valid_id)
        z_top = z.gather(1, ids)
        z.scatter_(1, ids, -torch.inf)
        lse_rest = torch.logsumexp(z, dim=-1).clamp(min=torch.finfo(torch.float32).min)  # -inf: top-k = vocab
        student = torch.cat([(z_top - lse[:, None]).masked_fill(~valid, -torch.inf),
                             (lse_rest - lse).clamp(min=-1e4)[:, None]], dim=1)
        teacher_top = top_logprobs.masked_fill(~valid, -torch.inf)
        teacher = torch.cat([teacher_top, _log1mexp(torch.logsumexp(teacher_top, dim=-1))[:, None]], dim=1)
        log_ps = torch.log_softmax(student / temperature, dim=-1)
        log_pt = torch.log_softmax(teacher / temperature, dim=-1)
        p_s, p_t = log_ps.exp(), log_pt.exp()
        kl = torch.where(p_t > 0, p_t * (log_pt - log_ps), 0.0).sum(-1)
        a = temperature * (p_s - p_t)
        rest_coef = alpha * torch.exp(lse_rest - lse) + (1 - alpha) * a[:, -1]
        g = z.sub_(lse_rest[:, None]).exp_().mul_(rest_coef[:, None])  # the top-k ids are -inf -> 0 here
        top_grad = alpha * torch.exp(z_top - lse[:, None]) + (1 - alpha) * a[:, :-1]
        g.scatter_add_(1, ids, top_grad.masked_fill(~valid, 0.0))
    g.scatter_add_(1, target[:, None], torch.full_like(ce[:, None], -alpha))
    return ce, kl, g


# ---------------------------------------------------------------------------------------- the trainer
class SparseKDTrainer(SFTTrainer):
    """SFTTrainer whose loss is alpha * CE + (1 - alpha) * T^2 * KD (module docstring). Sparse KD reads the
    teacher's top-k from the batch (prepare_kd_dataset + KDCollator); with `teacher_model` it is online KD."""

    loss_is_scaled_for_ga = True  # compute_loss divides by num_items_in_batch itself

    def __init__(self, *args, kd_alpha: float = 0.5, kd_temperature: float = 1.0, kd_chunk_size: int = 1024,
                 teacher_model=None, kd_divergence: str = "forward", kd_jsd_beta: float = 0.5, **kwargs):
        if not 0.0 <= kd_alpha <= 1.0:
            raise ValueError(f"kd_alpha: {kd_alpha} is not within [0, 1]")
        if kd_temperature <= 0:
            raise ValueError(f"kd_temperature: {kd_temperature} must be > 0")
        if kd_chunk_size < 1:
            raise ValueError(f"kd_chunk_size: {kd_chunk_size} must be >= 1")
        if kd_divergence not in ("forward", "reverse", "jsd"):
            raise ValueError(f"kd_divergence: {kd_divergence!r} is not one of forward, reverse, jsd")
        if teacher_model is None and kd_divergence != "forward":
            raise ValueError(f"kd_divergence: {kd_divergence} needs the teacher's full distribution (kd: online); "
                             "kd: sparse matches stored top-k logprobs with the forward KL")
        if kd_divergence == "jsd" and not 0.0 < kd_jsd_beta < 1.0:
            raise ValueError(f"kd_jsd_beta: {kd_jsd_beta} is not within (0, 1)")
        if teacher_model is None and kwargs.get("data_collator") is None:
            tokenizer = kwargs.get("processing_class")
            if tokenizer is None:
                raise ValueError("processing_class: kd: sparse needs the tokenizer (for the padding id)")
            kwargs["data_collator"] = KDCollator(pad_token_id=tokenizer.pad_token_id)
        self.kd_alpha, self.kd_temperature, self.kd_chunk_size = kd_alpha, kd_temperature, kd_chunk_size
        self.kd_beta = DIVERGENCE_BETA.get(kd_divergence, kd_jsd_beta)
        config = kwargs.get("args", args[1] if len(args) > 1 else None)
        if config is not None and (config.packing or config.padding_free):
            raise ValueError("packing / padding_free: not supported with kd (the teacher's per-position logprobs "
                             "and the KD loss work on one sequence per row); set packing: false")
        super().__init__(*args, **kwargs)
        self.teacher_model = None if teacher_model is None else self._prepare_teacher(teacher_model)
        self._kd_totals = {}  # mode -> [CE sum, KD sum, tokens] since the last log

    def _prepare_teacher(self, teacher):
        teacher.eval()
        for p in teacher.parameters():
            p.requires_grad_(False)
        if self.is_deepspeed_enabled:
            from trl.models import prepare_deepspeed

            return prepare_deepspeed(teacher, self.accelerator)
        return self.accelerator.prepare_model(teacher, evaluation_mode=True)

    def _set_signature_columns_if_needed(self):
        super()._set_signature_columns_if_needed()  # remove_unused_columns would drop the teacher's columns
        self._signature_columns = [*self._signature_columns, *KD_COLUMNS]

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        mode = "train" if self.model.training else "eval"
        unwrapped = self.accelerator.unwrap_model(model)
        # Through the wrapper's forward, so DDP/FSDP/DeepSpeed see a forward call (gradient sync, gathered shards)
        loss_sum, ce_sum, kd_sum, n_tokens = _redirect_forward(model, unwrapped, self._loss_terms, unwrapped, inputs)
        if num_items_in_batch is None:  # not counted by the Trainer (eval): this batch's mean, split over the steps
            steps = self.current_gradient_accumulation_steps if self.model.training else 1
            loss = loss_sum / n_tokens.clamp(min=1) / steps
        else:
            loss = loss_sum / torch.as_tensor(num_items_in_batch, device=loss_sum.device)
        if self.args.average_tokens_across_devices and num_items_in_batch is not None:
            loss = loss * self.accelerator.num_processes  # num_items counts every rank; DDP averages the gradients
        self._log_terms(mode, inputs, ce_sum, kd_sum, n_tokens)
        if return_outputs:  # the logits, for compute_metrics, cost one more forward (like SFTTrainer's)
            with torch.no_grad():
                outputs = model(input_ids=inputs["input_ids"], attention_mask=inputs.get("attention_mask"))
            return loss, outputs
        return loss

    def _loss_terms(self, unwrapped, inputs):
        lm = unwrapped.get_base_model() if is_peft_model(unwrapped) else unwrapped
        hidden = _last_hidden_state(lm, inputs)
        head = lm.get_output_embeddings()
        labels = inputs["labels"]
        if self.teacher_model is None:
            loss, ce, kl, n = sparse_kd_loss(hidden, head.weight, head.bias, labels, inputs["teacher_top_ids"],
                                             inputs["teacher_top_logprobs"], self.kd_alpha, self.kd_temperature,
                                             self.kd_chunk_size)
            return loss, ce.detach(), kl.detach(), n
        # online: CE from the same chunked function (K = 0), the divergence from TRL's kernel
        _, ce, _, n = sparse_kd_loss(hidden, head.weight, head.bias, labels, None, None, 1.0, 1.0,
                                     self.kd_chunk_size)
        teacher = self.accelerator.unwrap_model(self.teacher_model)
        with torch.no_grad():
            teacher_hidden = _redirect_forward(self.teacher_model, teacher, _last_hidden_state, teacher, inputs)
        mask = labels[:, 1:] != -100
        teacher_head = teacher.get_output_embeddings()
        divergence, _ = ChunkedDivergenceFunction.apply(
            hidden[:, :-1][mask], head.weight, head.bias, teacher_hidden[:, :-1][mask],
            teacher_head.weight, teacher_head.bias, self.kd_beta, self.kd_temperature)
        kd = divergence.sum()
        loss = self.kd_alpha * ce + (1 - self.kd_alpha) * self.kd_temperature**2 * kd
        return loss, ce.detach(), kd.detach(), n

    def _log_terms(self, mode, inputs, ce_sum, kd_sum, n_tokens):
        # sums, divided at log time: token means over the whole logging window, whatever the accumulation split
        gather = self.accelerator.gather_for_metrics
        totals = self._kd_totals.setdefault(mode, torch.zeros(3, dtype=torch.float64))
        totals += gather(torch.stack([ce_sum, kd_sum, n_tokens.to(ce_sum.dtype)]).reshape(1, 3)).sum(0).cpu()
        if mode == "train":  # the tokens-seen counter SFTTrainer keeps, for comparable logs
            self._total_train_tokens += gather(inputs["attention_mask"].sum().reshape(1)).sum().item()
            self._metrics[mode]["num_tokens"] = [self._total_train_tokens]

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        mode = "train" if self.model.training else "eval"
        ce_sum, kd_sum, n = self._kd_totals.pop(mode, torch.zeros(3)).tolist()
        if n:
            self._metrics[mode]["ce"], self._metrics[mode]["kd"] = [ce_sum / n], [kd_sum / n]
        super().log(logs, start_time)


def _last_hidden_state(lm, inputs) -> torch.Tensor:
    """The final (normed) hidden states of a causal LM's backbone: everything but the LM head."""
    return lm.base_model(input_ids=inputs["input_ids"], attention_mask=inputs.get("attention_mask"),
                         use_cache=False).last_hidden_state


def _redirect_forward(wrapper, module, method, *args):
    """Run method(*args) as the forward of `wrapper` (DDP/FSDP/DeepSpeed around `module`): the wrapper's forward
    hooks fire as for a normal call (lightning's forward redirection, as in TRL's DistillationTrainer)."""
    original = module.forward

    def forward(*_args):
        module.forward = original
        return method(*_args)

    module.forward = forward
    try:
        return wrapper(*args)
    finally:
        module.forward = original


# ---------------------------------------------------------------------------------------- online KD
def build_online_kd_trainer(model, teacher_model, args, train_dataset, processing_class, peft_config=None,
                            kd_alpha: float = 0.5, kd_temperature: float = 1.0, kd_chunk_size: int = 1024,
                            kd_divergence: str = "forward", kd_jsd_beta: float = 0.5, **trainer_kwargs):
    """A SparseKDTrainer doing online KD from `teacher_model` (a model or a path/name, loaded in the student's
    dtype) on an ordinary SFT dataset; the teacher's tokenizer must be the student's."""
    if not teacher_model:
        raise ValueError("teacher_model: kd: online needs a teacher model path")
    if isinstance(teacher_model, str) or hasattr(teacher_model, "__fspath__"):
        from transformers import AutoModelForCausalLM

        check_same_tokenizer(processing_class, str(teacher_model))
        init = dict(args.model_init_kwargs or {})
        dtype = init.get("dtype", "bfloat16" if args.bf16 else "float32")
        teacher_model = AutoModelForCausalLM.from_pretrained(str(teacher_model), dtype=dtype)
    else:
        check_same_tokenizer(processing_class, teacher_model.name_or_path)
    log.info("online KD from %s (%s, alpha %s, T %s)", teacher_model.name_or_path, kd_divergence, kd_alpha,
             kd_temperature)
    return SparseKDTrainer(model=model, args=args, train_dataset=train_dataset, processing_class=processing_class,
                           peft_config=peft_config, teacher_model=teacher_model, kd_alpha=kd_alpha,
                           kd_temperature=kd_temperature, kd_chunk_size=kd_chunk_size, kd_divergence=kd_divergence,
                           kd_jsd_beta=kd_jsd_beta, **trainer_kwargs)
