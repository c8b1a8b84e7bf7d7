"""DistillTrainer: TRL's SFTTrainer whose loss is a weighted sum of named parts (the stage's only subclass).

    loss = sum over parts of weight * (the part summed over the completion tokens)
           / (the completion tokens of the whole accumulated batch, counted here)

Parts today: `ce`, cross-entropy on the teacher's tokens (temperature 1), weight kd_alpha; and `kd`, KL from the
teacher (kd: sparse, its stored top-k + rest bucket, read from the batch: sft/kd_data.py; kd: online, an in-process
teacher's full distribution), weight (1 - kd_alpha) * T^2. Each part is logged as its token mean over the logging
window (`ce`, `kd` in the logs and sft_metrics.json's log_history). Counting the tokens here, not in transformers
(which counts only for models that take loss kwargs: not Gemma3 or Qwen2.5-VL conditional generation), keeps
8x1 and 2x4 accumulation the same update on every model.

Adding a part (feature alignment, attention transfer, another teacher...): compute it in `loss_parts` from the
backbone outputs (`_backbone`: the student's with gradient, the teacher's once per step), return it by name, and
weigh it in `part_weights`; every KD temperature is read from `kd_temperature()`, the one place a schedule over
`self.state.global_step` would go. The losses themselves are tensor code in sft/losses.py.
"""

import torch
from accelerate.utils import is_peft_model
from trl import SFTTrainer

from sft.config import DistillArguments
from sft.heads import check_output_head, output_head
from sft.kd_data import KD_COLUMNS, KDCollator
from sft.losses import DIVERGENCE_BETA, online_divergence, sparse_kd_loss


class DistillTrainer(SFTTrainer):
    """SFTTrainer for kd: sparse (the teacher's top-k in the batch) or kd: online (`teacher_model` in process)."""

    loss_is_scaled_for_ga = True  # compute_loss divides by the accumulated batch's tokens itself

    def __init__(self, *args, distill: DistillArguments, teacher_model=None, **kwargs):
        if distill.kd not in ("sparse", "online") or (distill.kd == "online") != (teacher_model is not None):
            raise ValueError(f"DistillTrainer: kd {distill.kd!r} with teacher_model {teacher_model!r}: kd: online "
                             "takes a teacher model, kd: sparse reads the teacher from the batch")
        if distill.kd == "sparse" and kwargs.get("data_collator") is None:
            kwargs["data_collator"] = KDCollator(pad_token_id=kwargs["processing_class"].pad_token_id)
        super().__init__(*args, **kwargs)
        self.distill = distill
        self.teacher_model = None if teacher_model is None else self._prepare_teacher(teacher_model)
        self._heads_checked = False
        self._windows = {}  # mode -> {part: sum over the logging window, "tokens": count}

    # --- the loss -------------------------------------------------------------------------------------------
    def kd_temperature(self) -> float:
        return self.distill.kd_temperature

    def part_weights(self) -> dict[str, float]:
        alpha = self.distill.kd_alpha
        return {"ce": alpha, "kd": (1 - alpha) * self.kd_temperature() ** 2}

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        mode = "train" if self.model.training else "eval"
        unwrapped = self.accelerator.unwrap_model(model)
        # Through the wrapper's forward, so DDP/FSDP/DeepSpeed see a forward call (gradient sync, gathered shards)
        loss, parts, tokens = _redirect_forward(model, unwrapped, self.loss_parts, unwrapped, inputs)
        items = tokens if num_items_in_batch is None else num_items_in_batch  # None: eval, this batch's mean
        loss = loss / torch.as_tensor(items, device=loss.device).clamp(min=1)
        if self.args.average_tokens_across_devices and num_items_in_batch is not None:
            loss = loss * self.accelerator.num_processes  # the count covers every rank; DDP averages the gradients
        self._add_to_window(mode, parts, tokens, inputs)
        if return_outputs:  # the logits, for compute_metrics, cost one more forward (like SFTTrainer's)
            with torch.no_grad():
                outputs = model(input_ids=inputs["input_ids"], attention_mask=inputs.get("attention_mask"))
            return loss, outputs
        return loss

    def loss_parts(self, unwrapped, inputs) -> tuple[torch.Tensor, dict[str, torch.Tensor], torch.Tensor]:
        """(weighted sum with gradient, {part: its sum over the completion tokens, detached}, completion tokens)."""
        lm = unwrapped.get_base_model() if is_peft_model(unwrapped) else unwrapped
        student, head = _backbone(lm, inputs), output_head(lm)
        if not self._heads_checked:
            check_output_head(lm, head, inputs, "model_name_or_path")
        weights, temperature, labels = self.part_weights(), self.kd_temperature(), inputs["labels"]
        chunk = self.distill.kd_chunk_size
        if self.distill.kd == "sparse":  # the teacher's top-k and rest come with the batch
            loss, ce, kd, tokens = sparse_kd_loss(
                student.last_hidden_state, head, labels, inputs["teacher_top_ids"], inputs["teacher_top_logprobs"],
                inputs["teacher_rest_logprobs"], weights["ce"], weights["kd"], temperature, chunk)
        else:  # online: CE from the same chunked function (no top-k), the divergence from TRL's kernel
            loss, ce, _, tokens = sparse_kd_loss(student.last_hidden_state, head, labels, ce_weight=weights["ce"],
                                                 chunk_size=chunk)
            teacher, teacher_head = self._teacher_outputs(inputs)
            beta = DIVERGENCE_BETA.get(self.distill.kd_divergence, self.distill.kd_jsd_beta)
            kd = online_divergence(student.last_hidden_state, head, teacher.last_hidden_state, teacher_head, labels,
                                   beta, temperature)
            loss = loss + weights["kd"] * kd
            kd = kd.detach()
        self._heads_checked = True
        return loss, {"ce": ce, "kd": kd}, tokens

    # --- the teacher ----------------------------------------------------------------------------------------
    def _prepare_teacher(self, teacher):
        teacher.eval()
        for p in teacher.parameters():
            p.requires_grad_(False)
        if self.is_deepspeed_enabled:
            from trl.models import prepare_deepspeed

            return prepare_deepspeed(teacher, self.accelerator)
        return self.accelerator.prepare_model(teacher, evaluation_mode=True)

    @torch.no_grad()
    def _teacher_outputs(self, inputs):
        """The teacher's backbone outputs for the batch (one forward per step) and its output head."""
        teacher = self.accelerator.unwrap_model(self.teacher_model)

        def forward(inputs):
            head = output_head(teacher)
            if not self._heads_checked:
                check_output_head(teacher, head, inputs, "teacher_model")
            return _backbone(teacher, inputs), head

        return _redirect_forward(self.teacher_model, teacher, forward, inputs)

    # --- batches and logs -----------------------------------------------------------------------------------
    def get_batch_samples(self, epoch_iterator, num_batches, device):
        """The micro-batches of one optimizer step and their completion tokens (the loss's own count)."""
        batches, _ = super().get_batch_samples(epoch_iterator, num_batches, device)
        if not batches:
            return batches, None
        items = sum((b["labels"][:, 1:] != -100).sum() for b in batches).to(device)
        if self.args.average_tokens_across_devices and self.args.world_size > 1:
            items = self.accelerator.gather(items).sum()
        return batches, items

    def _set_signature_columns_if_needed(self):
        super()._set_signature_columns_if_needed()  # remove_unused_columns would drop the teacher's columns
        self._signature_columns = [*self._signature_columns, *KD_COLUMNS]

    def _add_to_window(self, mode, parts: dict[str, torch.Tensor], tokens, inputs):
        # sums, divided at log time: token means over the whole logging window, whatever the accumulation split
        names = sorted(parts)
        values = torch.stack([*(parts[name].float() for name in names), tokens.float()]).reshape(1, -1)
        sums = self.accelerator.gather_for_metrics(values).sum(0).double().cpu().tolist()
        window = self._windows.setdefault(mode, {})
        for name, value in zip([*names, "tokens"], sums, strict=True):
            window[name] = window.get(name, 0.0) + value
        if mode == "train":  # the tokens-seen counter SFTTrainer keeps, for comparable logs
            self._total_train_tokens += self.accelerator.gather_for_metrics(
                inputs["attention_mask"].sum().reshape(1)).sum().item()
            self._metrics[mode]["num_tokens"] = [self._total_train_tokens]

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        mode = "train" if self.model.training else "eval"
        window = self._windows.pop(mode, {})
        tokens = window.pop("tokens", 0)
        for name, total in window.items():
            if tokens:
                self._metrics[mode][name] = [total / tokens]
        super().log(logs, start_time)


def _backbone(lm, inputs):
    """The backbone's outputs (final normed hidden states: everything but the LM head) of a causal LM."""
    return lm.base_model(input_ids=inputs["input_ids"], attention_mask=inputs.get("attention_mask"), use_cache=False)


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
