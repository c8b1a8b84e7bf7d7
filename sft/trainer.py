"""DistillTrainer: TRL's SFTTrainer whose loss is a weighted sum of named parts (the stage's only subclass).

    loss = sum over parts of weight * (the part summed over the completion tokens)
           / (the completion tokens of the whole accumulated batch, counted here)

Parts: `ce`, cross-entropy on the teacher's tokens (temperature 1), weight kd_alpha (1 with kd: none); `kd`, KL
from the teacher (kd: sparse, its stored top-k + rest bucket, read from the batch: sft/kd_data.py; kd: online, an
in-process teacher's full distribution, or the teacher_weights-weighted sum over several teachers), weight
(1 - kd_alpha) * T^2; `feature`, hidden-state alignment at mapped layers, weight feature_weight; `attention`,
attention transfer over the last layers, weight attention_weight (both against the first in-process teacher,
sft/features.py). Each part is logged as its token mean over the logging window (in the logs and
sft_metrics.json's log_history), with the step's `kd_temperature`. Counting the tokens here, not in transformers
(which counts only for models that take loss kwargs: not Gemma3 or Qwen2.5-VL conditional generation), keeps
8x1 and 2x4 accumulation the same update on every model.

Adding a part: compute it in `loss_parts` from the backbone outputs (`_backbone`: the student's with gradient, the
teachers' once per step), return it by name, and weigh it in `part_weights`. Every KD mode reads the step's
temperature from `kd_temperature()` (the schedule of sft/schedule.py at `self.state.global_step`). The feature
projection (when the widths differ) is trained here but kept out of the student: an extra parameter group of the
optimizer, saved as feature_projection.pt in checkpoint-*/ for resuming, absent from the exported model.
"""

import os
from contextlib import nullcontext

import torch
from accelerate.utils import is_peft_model
from trl import SFTTrainer

from data.config import ConfigError
from sft import features
from sft.config import DistillArguments
from sft.heads import check_output_head, output_head
from sft.kd_data import KD_COLUMNS, KDCollator
from sft.losses import DIVERGENCE_BETA, online_divergence, sparse_kd_loss
from sft.packing import pack_kd, packed
from sft.schedule import temperature_at

MODEL_INPUTS = ("input_ids", "attention_mask", "position_ids", "cu_seq_lens_q", "cu_seq_lens_k", "max_length_q",
                  "max_length_k", "seq_idx")
PROJECTION_FILE = "feature_projection.pt"  # in checkpoint-*/ beside optimizer.pt: training state, not the model


class DistillTrainer(SFTTrainer):
    """SFTTrainer for kd: sparse (the teacher's top-k in the batch), kd: online (`teacher_model` in process: one
    model or a list), and feature / attention alignment (against the first in-process teacher, with any kd)."""

    loss_is_scaled_for_ga = True  # compute_loss divides by the accumulated batch's tokens itself

    def __init__(self, *args, distill: DistillArguments, teacher_model=None, **kwargs):
        teachers = [] if teacher_model is None else list(teacher_model) if isinstance(teacher_model, list) \
            else [teacher_model]
        wants_teacher = distill.kd == "online" or distill.feature_weight > 0 or distill.attention_weight > 0
        if distill.kd not in ("none", "sparse", "online", "on_policy") or wants_teacher != bool(teachers):
            raise ValueError(f"DistillTrainer: kd {distill.kd!r}, feature_weight {distill.feature_weight}, "
                             f"attention_weight {distill.attention_weight} with {len(teachers)} teacher model(s): "
                             "kd: online and feature/attention alignment take in-process teachers, kd: sparse "
                             "alone reads the teacher from the batch")
        training_args = kwargs["args"]
        packed_here = distill.kd == "sparse" and packed(training_args)  # TRL's packing would drop the top-k columns
        if packed_here and training_args.packing:
            kwargs["train_dataset"] = pack_kd(kwargs["train_dataset"], training_args, ("input_ids", "labels",
                                                                                       *KD_COLUMNS))
        if distill.kd == "sparse" and kwargs.get("data_collator") is None:
            kwargs["data_collator"] = KDCollator(pad_token_id=kwargs["processing_class"].pad_token_id,
                                                 padding_free=packed_here)
        flags = training_args.packing, training_args.padding_free
        if packed_here:  # packed above and flattened by our collator: TRL is told a plain dataset comes in
            training_args.packing = training_args.padding_free = False
        try:
            super().__init__(*args, **kwargs)
        finally:
            training_args.packing, training_args.padding_free = flags
        self.distill = distill
        self.teachers = [self._prepare_teacher(t) for t in teachers]
        self.teacher_model = self.teachers[0] if self.teachers else None
        weights = distill.teacher_weights or [1.0] * len(teachers)
        self.teacher_weights = [w / sum(weights) for w in weights]
        self._setup_alignment(teachers[0] if teachers else None)
        self._heads_checked = False
        self._step_temperature = None  # the temperature of the last loss computed, for the logs
        self._windows = {}  # mode -> {part: sum over the logging window, "tokens": count}

    def _setup_alignment(self, teacher) -> None:
        """The feature layer map and projection and the attention layer pairs, from the two models' shapes."""
        self.feature_map, self.attention_map, self.projection = {}, {}, None
        if teacher is None:
            return
        student_cfg, teacher_cfg = self.model.config.get_text_config(), teacher.config.get_text_config()
        depth = (student_cfg.num_hidden_layers, teacher_cfg.num_hidden_layers)
        if self.distill.feature_weight > 0:
            self.feature_map = self.distill.feature_layers or features.uniform_layer_map(*depth)
            features.check_layer_map(self.feature_map, *depth)
            self.projection = features.feature_projection(self.feature_map, student_cfg.hidden_size,
                                                          teacher_cfg.hidden_size)
            if self.projection is not None:
                if self.is_deepspeed_enabled:
                    raise ConfigError("feature_weight: a student narrower than its teacher needs a feature projection, "
                                      "which DeepSpeed's optimizer does not hold; use FSDP or DDP")
                self.projection.to(self.args.device)
        if self.distill.attention_weight > 0:
            self.attention_map = features.attention_pairs(*depth, self.distill.attention_layers)
            if self.args.gradient_checkpointing and (self.args.gradient_checkpointing_kwargs or {}).get("use_reentrant"):
                # reentrant checkpointing runs the layers without autograd: the captured q/k would carry no gradient
                raise ConfigError("attention_weight: needs gradient_checkpointing_kwargs {use_reentrant: false} (the "
                                  "default of transformers 5) or gradient_checkpointing: false")

    # --- the loss -------------------------------------------------------------------------------------------
    def kd_temperature(self) -> float:
        """The KD temperature of the current optimizer step, for every KD mode (sft/schedule.py)."""
        d = self.distill
        return temperature_at(self.state.global_step, self.state.max_steps, d.kd_temperature, d.kd_temperature_end,
                              d.kd_temperature_schedule)

    def part_weights(self) -> dict[str, float]:
        alpha, d = self.distill.kd_alpha, self.distill
        weights = {"ce": 1.0} if d.kd == "none" else {"ce": alpha, "kd": (1 - alpha) * self.kd_temperature() ** 2}
        if d.feature_weight > 0:
            weights["feature"] = d.feature_weight
        if d.attention_weight > 0:
            weights["attention"] = d.attention_weight
        return weights

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
                outputs = model(**model_inputs(inputs))
            return loss, outputs
        return loss

    def loss_parts(self, unwrapped, inputs) -> tuple[torch.Tensor, dict[str, torch.Tensor], torch.Tensor]:
        """(weighted sum with gradient, {part: its sum over the completion tokens, detached}, completion tokens)."""
        lm = unwrapped.get_base_model() if is_peft_model(unwrapped) else unwrapped
        with self._recording(lm) as recorded:
            student = _backbone(lm, inputs)
        head = output_head(lm)
        if not self._heads_checked:
            check_output_head(lm, head, inputs, "model_name_or_path")
        weights, temperature, labels = self.part_weights(), self.kd_temperature(), inputs["labels"]
        self._step_temperature = temperature
        chunk, hidden = self.distill.kd_chunk_size, student.last_hidden_state
        if self.distill.kd == "sparse":  # the teacher's top-k and rest come with the batch
            loss, ce, kd, tokens = sparse_kd_loss(
                hidden, head, labels, inputs["teacher_top_ids"], inputs["teacher_top_logprobs"],
                inputs["teacher_rest_logprobs"], weights["ce"], weights["kd"], temperature, chunk)
            parts = {"ce": ce, "kd": kd}
        else:  # CE from the same chunked function (no top-k); online: the divergence from TRL's kernel
            loss, ce, _, tokens = sparse_kd_loss(hidden, head, labels, ce_weight=weights["ce"], chunk_size=chunk)
            parts = {"ce": ce}
        teachers = self._teacher_outputs(inputs) if self.teachers else []
        if self.distill.kd == "online":
            beta = DIVERGENCE_BETA.get(self.distill.kd_divergence, self.distill.kd_jsd_beta)
            kd = sum(w * online_divergence(hidden, head, out.last_hidden_state, t_head, labels, beta, temperature)
                     for w, (out, t_head, _) in zip(self.teacher_weights, teachers, strict=True))
            loss = loss + weights["kd"] * kd
            parts["kd"] = kd.detach()
        rows = torch.zeros_like(labels, dtype=torch.bool)
        rows[:, :-1] = labels[:, 1:] != -100  # the positions that predict a completion token
        if self.feature_map:
            feature = features.feature_loss(recorded.hidden, teachers[0][2].hidden, self.feature_map, rows,
                                            self.projection, self.distill.feature_loss)
            loss = loss + weights["feature"] * feature
            parts["feature"] = feature.detach()
        if self.attention_map:
            attention = features.attention_loss(recorded.attention, teachers[0][2].attention, self.attention_map,
                                                rows, self.distill.attention_chunk_size)
            loss = loss + weights["attention"] * attention
            parts["attention"] = attention.detach()
        self._heads_checked = True
        return loss, parts, tokens

    def _recording(self, lm, teacher: bool = False):
        """Hidden states and attention inputs of the layers the alignment parts compare, for one forward."""
        if not (self.feature_map or self.attention_map):
            return nullcontext(features.Recorded())
        pick = 1 if teacher else 0
        return features.recording(lm, {pair[pick] for pair in self.feature_map.items()},
                                  {pair[pick] for pair in self.attention_map.items()})

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
    def _teacher_outputs(self, inputs) -> list[tuple]:
        """Per teacher: its backbone outputs for the batch (one forward per step), its output head, and what the
        alignment parts recorded (the first teacher's layers only)."""
        outputs = []
        for i, wrapped in enumerate(self.teachers):
            teacher = self.accelerator.unwrap_model(wrapped)

            def forward(inputs, teacher=teacher, first=i == 0):
                head = output_head(teacher)
                if not self._heads_checked:
                    check_output_head(teacher, head, inputs, "teacher_model")
                with self._recording(teacher, teacher=True) if first else nullcontext(None) as recorded:
                    out = _backbone(teacher, inputs)
                return out, head, recorded

            outputs.append(_redirect_forward(wrapped, teacher, forward, inputs))
        return outputs

    # --- the feature projection: trained with the student, kept out of it ----------------------------------
    def create_optimizer(self, model=None):
        optimizer = super().create_optimizer(model)
        if self.projection is not None:
            optimizer.add_param_group({"params": list(self.projection.parameters()), "weight_decay": 0.0})
        return optimizer

    def training_step(self, model, inputs, num_items_in_batch=None):
        loss = super().training_step(model, inputs, num_items_in_batch)
        if self.projection is not None and self.args.world_size > 1:  # DDP/FSDP sync the student's gradients only
            for p in self.projection.parameters():
                torch.distributed.all_reduce(p.grad)
                p.grad /= self.args.world_size
        return loss

    def _save_optimizer_and_scheduler(self, output_dir: str) -> None:
        super()._save_optimizer_and_scheduler(output_dir)
        if self.projection is not None and self.args.should_save:
            torch.save(self.projection.state_dict(), os.path.join(output_dir, PROJECTION_FILE))

    def _load_optimizer_and_scheduler(self, checkpoint: str | None) -> None:
        if checkpoint is not None and self.projection is not None:
            path = os.path.join(checkpoint, PROJECTION_FILE)
            if not os.path.exists(path):
                raise ConfigError(f"feature_weight: {checkpoint} has no {PROJECTION_FILE} (it was not saved by a run "
                                  "with feature alignment); resume from a matching checkpoint or a new output_dir")
            self.projection.load_state_dict(torch.load(path, map_location=self.args.device, weights_only=True))
        super()._load_optimizer_and_scheduler(checkpoint)

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
            mask = inputs.get("attention_mask")
            seen = torch.as_tensor(inputs["input_ids"].numel(), device=tokens.device) if mask is None else mask.sum()
            self._total_train_tokens += self.accelerator.gather_for_metrics(seen.reshape(1)).sum().item()
            self._metrics[mode]["num_tokens"] = [self._total_train_tokens]

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        mode = "train" if self.model.training else "eval"
        window = self._windows.pop(mode, {})
        tokens = window.pop("tokens", 0)
        for name, total in window.items():
            if tokens:
                self._metrics[mode][name] = [total / tokens]
        if self.distill.kd != "none" and self._step_temperature is not None:
            self._metrics[mode]["kd_temperature"] = [self._step_temperature]
        super().log(logs, start_time)


def _backbone(lm, inputs):
    """The backbone's outputs (final normed hidden states: everything but the LM head) of a causal LM."""
    return lm.base_model(**model_inputs(inputs), use_cache=False)


def model_inputs(inputs) -> dict:
    """What the model reads from a batch: ids, the padding mask, or a padding-free row's positions and boundaries
    (sft/packing.py; the teacher sees the same row with the same position ids)."""
    return {name: inputs[name] for name in MODEL_INPUTS if inputs.get(name) is not None}


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
