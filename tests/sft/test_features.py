"""Feature alignment and attention transfer against dense float64 references (value and gradient), zero when the
student is the teacher, the layer map and projection shapes, and several teachers in online KD."""

import copy
import json
import math
from dataclasses import replace

import pytest
import torch
from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

from sft.config import ConfigError, DistillArguments
from sft.features import attention_pairs, uniform_layer_map
from sft.trainer import DistillTrainer
from tests.sft.tiny import kd_rows, training_args


@pytest.fixture(scope="module")
def tokenizer(toyworld):
    return AutoTokenizer.from_pretrained(toyworld.tokenizer)


def qwen2(tokenizer, layers: int, hidden: int = 32, heads: int = 2, kv_heads: int = 2, seed: int = 0,
          attn: str = "sdpa") -> Qwen2ForCausalLM:
    torch.manual_seed(seed)
    config = Qwen2Config(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden,
                         num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                         head_dim=16, tie_word_embeddings=False, pad_token_id=tokenizer.pad_token_id,
                         attn_implementation=attn)
    return Qwen2ForCausalLM(config)


def distill(**kw) -> DistillArguments:
    return DistillArguments(**{"dataset": "unused", "kd": "none", "teacher_model": "unused", "kd_chunk_size": 5,
                               **kw})


def trainer_for(student, teacher, tokenizer, out, d: DistillArguments, rows):
    return DistillTrainer(model=student, args=training_args(out), train_dataset=rows, processing_class=tokenizer,
                          distill=d, teacher_model=teacher)


def batch_of(tokenizer, n: int = 4):
    rows = kd_rows(len(tokenizer), n=n).select_columns(["input_ids", "labels"])
    return rows, rows


def layer_outputs(model, batch) -> list[torch.Tensor]:
    """Every decoder layer's output, by the model's own output_hidden_states (the last one without the final norm,
    which output_hidden_states applies to it)."""
    norm = model.model.norm
    model.model.norm = torch.nn.Identity()
    try:
        out = model.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], output_hidden_states=True)
    finally:
        model.model.norm = norm
    return list(out.hidden_states[1:])


def completion_rows(labels):
    rows = torch.zeros_like(labels, dtype=torch.bool)
    rows[:, :-1] = labels[:, 1:] != -100
    return rows


def dense_ce(model, batch):
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.double()
    labels = batch["labels"]
    mask = labels[:, 1:] != -100
    return -logits[:, :-1][mask].log_softmax(-1).gather(1, labels[:, 1:][mask][:, None]).sum()


def dense_feature(student, teacher, batch, layer_map, projection, kind):
    rows = completion_rows(batch["labels"])
    hs, ht = layer_outputs(student, batch), layer_outputs(teacher, batch)
    total = 0.0
    for s, t in layer_map.items():
        h = hs[s - 1][rows]
        if projection is not None:
            h = h @ projection[str(s)].weight.t()
        target = ht[t - 1][rows]
        if kind == "mse":
            total = total + ((h - target) ** 2).mean(-1).sum()
        else:
            total = total + (1 - (h * target).sum(-1) / (h.norm(dim=-1) * target.norm(dim=-1))).sum()
    return total / len(layer_map)


def dense_attention(student, teacher, batch, pairs):
    """KL(teacher || student) of eager attention weights, head by head or of head means, per completion row."""
    kwargs = dict(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], output_attentions=True)
    a_s, a_t = student.model(**kwargs).attentions, teacher.model(**kwargs).attentions
    rows = completion_rows(batch["labels"])
    total = 0.0
    for s, t in pairs.items():
        p_s, p_t = a_s[s - 1], a_t[t - 1]  # [B, H, T, T]
        if p_s.shape[1] != p_t.shape[1]:
            p_s, p_t = p_s.mean(1, keepdim=True), p_t.mean(1, keepdim=True)
        terms = torch.where(p_t > 0, p_t * (p_t.clamp_min(1e-300).log() - p_s.clamp_min(1e-300).log()), 0.0)
        kl = terms.sum(-1).mean(1)  # [B, T]
        total = total + kl[rows].sum()
    return total / len(pairs)


def eager64(model):
    model = copy.deepcopy(model).double()
    model.config._attn_implementation = "eager"
    return model


def assert_same_step(trainer, student, batch, want, student64, extra=()):
    tokens = (batch["labels"][:, 1:] != -100).sum()
    student.zero_grad()
    for p, _ in extra:
        p.grad = None
    loss = trainer.compute_loss(student, batch, num_items_in_batch=tokens)
    loss.backward()
    student64.zero_grad()
    want = want / tokens
    want.backward()
    assert loss.item() == pytest.approx(want.item(), rel=1e-5)
    for (name, p), p64 in zip(student.named_parameters(), student64.parameters(), strict=True):
        torch.testing.assert_close(p.grad.double(), p64.grad, rtol=1e-4, atol=1e-7, msg=lambda m, n=name: f"{n}: {m}")
    for p, p64 in extra:
        torch.testing.assert_close(p.grad.double(), p64.grad, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("shape", [(1, 32, 2, 48, "mse"), (2, 32, 4, 32, "mse"), (3, 32, 4, 48, "cosine")],
                         ids=lambda s: "x".join(map(str, s)))
def test_feature_loss_and_gradient_equal_the_dense_reference(tokenizer, tmp_path, shape):
    """Students shallower and narrower than the teacher: the uniform map, a learned projection where widths differ,
    and the gradient reaching every student weight and the projection."""
    s_layers, s_width, t_layers, t_width, kind = shape
    student = qwen2(tokenizer, s_layers, s_width, seed=0)
    teacher = qwen2(tokenizer, t_layers, t_width, seed=1)
    student64, teacher64 = eager64(student).train(), eager64(teacher)
    rows, _ = batch_of(tokenizer)
    d = distill(feature_weight=0.7, feature_loss=kind)
    trainer = trainer_for(student, teacher, tokenizer, tmp_path, d, rows)
    layer_map = uniform_layer_map(s_layers, t_layers)
    assert trainer.feature_map == layer_map and layer_map[s_layers] == t_layers
    projection64 = None if trainer.projection is None else copy.deepcopy(trainer.projection).double()
    if s_width == t_width:
        assert trainer.projection is None
    else:
        assert {k: tuple(v.weight.shape) for k, v in trainer.projection.items()} == \
            {str(s): (t_width, s_width) for s in layer_map}
    batch = trainer.data_collator([rows[i] for i in range(4)])
    student.train()
    want = dense_ce(student64, batch) + 0.7 * dense_feature(student64, teacher64, batch, layer_map, projection64, kind)
    extra = [] if projection64 is None else list(zip(trainer.projection.parameters(), projection64.parameters(),
                                                     strict=True))
    assert_same_step(trainer, student, batch, want, student64, extra)
    if extra:
        assert all(p.grad.abs().max() > 0 for p, _ in extra)


@pytest.mark.parametrize("shape", [(2, 2, 2, 2, 2, "sdpa"), (2, 2, 2, 2, 2, "eager"), (1, 2, 1, 4, 2, "sdpa"),
                                   (2, 2, 3, 2, 1, "sdpa")],
                         ids=["same-heads", "same-heads-eager", "2-vs-4-heads-gqa", "3-layers-gqa"])
def test_attention_loss_and_gradient_equal_the_dense_reference(tokenizer, tmp_path, shape):
    """The maps rebuilt from captured q/k (padded batch, chunks of 5 queries, GQA) against eager attention weights,
    for a student on sdpa and on eager attention."""
    s_layers, heads, t_layers, t_heads, t_kv, attn = shape
    student = qwen2(tokenizer, s_layers, heads=heads, kv_heads=heads, seed=0, attn=attn)
    teacher = qwen2(tokenizer, t_layers, heads=t_heads, kv_heads=t_kv, seed=1)
    student64, teacher64 = eager64(student).train(), eager64(teacher)
    rows, _ = batch_of(tokenizer)
    d = distill(attention_weight=2.0, attention_layers=min(s_layers, 2), attention_chunk_size=5)
    trainer = trainer_for(student, teacher, tokenizer, tmp_path, d, rows)
    pairs = attention_pairs(s_layers, t_layers, min(s_layers, 2))
    assert trainer.attention_map == pairs
    batch = trainer.data_collator([rows[i] for i in range(4)])
    assert (batch["attention_mask"] == 0).any()  # padded rows: the mask path is exercised
    student.train()
    want = dense_ce(student64, batch) + 2.0 * dense_attention(student64, teacher64, batch, pairs)
    assert_same_step(trainer, student, batch, want, student64)
    q_grad = student.model.layers[-1].self_attn.q_proj.weight.grad
    assert q_grad.abs().max() > 0  # attention transfer trains the queries


def test_alignment_is_zero_when_the_student_is_the_teacher(tokenizer, tmp_path):
    """Same shape, identity layer map: feature and attention parts vanish, and so does their gradient."""
    teacher = qwen2(tokenizer, 2, seed=3)
    student = copy.deepcopy(teacher)
    rows, _ = batch_of(tokenizer)
    for kind in ("mse", "cosine"):
        d = distill(feature_weight=1.0, feature_loss=kind, attention_weight=1.0, attention_layers=2, kd_alpha=1.0)
        trainer = trainer_for(student, teacher, tokenizer, tmp_path, d, rows)
        assert trainer.feature_map == {1: 1, 2: 2} and trainer.projection is None
        batch = trainer.data_collator([rows[i] for i in range(4)])
        _, parts, _ = trainer.loss_parts(student, batch)
        assert parts["feature"].item() == pytest.approx(0.0, abs=1e-5)
        assert parts["attention"].item() == pytest.approx(0.0, abs=1e-5)
        assert parts["ce"].item() > 1.0
        # with CE weighted 0 (kd: none weighs CE 1, so a weight-only trainer): no gradient from the parts
        trainer.part_weights = lambda: {"ce": 0.0, "feature": 1.0, "attention": 1.0}
        student.zero_grad()
        trainer.loss_parts(student, batch)[0].backward()
        assert max(p.grad.abs().max().item() for p in student.parameters() if p.grad is not None) < 1e-5


def test_layer_maps_and_projection_shapes(tokenizer, tmp_path):
    assert uniform_layer_map(2, 4) == {1: 2, 2: 4}
    assert uniform_layer_map(3, 4) == {1: 1, 2: 3, 3: 4}
    assert uniform_layer_map(4, 4) == {1: 1, 2: 2, 3: 3, 4: 4}
    assert uniform_layer_map(4, 2) == {1: 1, 2: 1, 3: 2, 4: 2}
    assert attention_pairs(2, 4, 2) == {1: 3, 2: 4}
    assert distill(feature_weight=1, feature_layers="1:3, 2:4").feature_layers == {1: 3, 2: 4}
    assert distill(feature_weight=1, feature_layers={"1": 2}).feature_layers == {1: 2}
    assert distill(feature_weight=1, feature_layers='{"2": 4}').feature_layers == {2: 4}
    rows, _ = batch_of(tokenizer, 2)
    student, teacher = qwen2(tokenizer, 2, 32), qwen2(tokenizer, 4, 64)
    trainer = trainer_for(student, teacher, tokenizer, tmp_path, distill(feature_weight=1, feature_layers="2:3"), rows)
    assert list(trainer.projection) == ["2"] and trainer.projection["2"].weight.shape == (64, 32)
    with pytest.raises(ConfigError, match="^feature_layers: {3: 4} is outside"):
        trainer_for(student, teacher, tokenizer, tmp_path, distill(feature_weight=1, feature_layers="3:4"), rows)
    with pytest.raises(ConfigError, match="^attention_layers: 3 is more than"):
        trainer_for(student, teacher, tokenizer, tmp_path, distill(attention_weight=1, attention_layers=3), rows)


def test_alignment_settings_are_checked_naming_them():
    for bad, name in (({"feature_layers": "1-2"}, "feature_layers"), ({"feature_layers": "0:1"}, "feature_layers"),
                      ({"feature_loss": "l1"}, "feature_loss"), ({"feature_weight": -1}, "feature_weight"),
                      ({"attention_layers": 0}, "attention_layers"),
                      ({"teacher_model": None, "attention_weight": 1.0}, "teacher_model"),
                      ({"kd": "online", "teacher_models": ["a", "b"]}, "teacher_models"),
                      ({"kd": "sparse", "teacher_model": None, "teacher_models": ["a", "b"]}, "teacher_models"),
                      ({"kd": "online", "teacher_model": None, "teacher_models": ["a", "b"], "teacher_weights": [1]},
                       "teacher_weights")):
        with pytest.raises(ConfigError, match=f"^{name}:"):
            distill(**bad)


def test_online_kd_with_several_teachers_is_the_weighted_sum(tokenizer, tmp_path):
    """Two teachers weighted 3:1: the KD part equals 0.75 x the part with the first alone + 0.25 x the second's."""
    student = qwen2(tokenizer, 1, seed=0)
    teachers = [qwen2(tokenizer, 2, seed=1), qwen2(tokenizer, 1, 48, seed=2)]
    rows, _ = batch_of(tokenizer)
    d = distill(kd="online", teacher_model=None, teacher_models=["a", "b"], teacher_weights=[3.0, 1.0],
                kd_temperature=2.0)
    trainer = trainer_for(student, teachers, tokenizer, tmp_path, d, rows)
    assert trainer.teacher_weights == [0.75, 0.25]
    batch = trainer.data_collator([rows[i] for i in range(4)])
    _, parts, _ = trainer.loss_parts(student, batch)
    single = []
    for teacher in teachers:
        one = trainer_for(student, teacher, tokenizer, tmp_path,
                          replace(d, teacher_models=None, teacher_weights=None, teacher_model="x"), rows)
        single.append(one.loss_parts(student, batch)[1]["kd"].item())
    assert single[0] != pytest.approx(single[1], rel=1e-3)
    assert parts["kd"].item() == pytest.approx(0.75 * single[0] + 0.25 * single[1], rel=1e-5)
    assert not math.isclose(parts["kd"].item(), 0.0)


@pytest.fixture(scope="module")
def narrow_student(toyworld, tmp_path_factory):
    """A 1-layer, 32-wide student of the toy world's tokenizer: narrower and shallower than the toy teacher (128)."""
    tokenizer = AutoTokenizer.from_pretrained(toyworld.tokenizer)
    path = tmp_path_factory.mktemp("narrow-student")
    qwen2(tokenizer, 1, 32, seed=0).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def test_python_m_sft_trains_every_part_and_exports_a_plain_student(toyworld, narrow_student, tmp_path):
    """kd: online + feature + attention + a cosine schedule through main(): every part and the temperature logged and
    in sft_metrics.json; the projection in checkpoint-*/ only; the student loads with no unexpected key; a rerun
    resumes with the projection's optimizer state."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from sft.main import main

    out = tmp_path / "out"
    flags = ["--dataset", str(toyworld.gold), "--model_name_or_path", str(narrow_student), "--output_dir", str(out),
             "--kd", "online", "--teacher_model", str(toyworld.teacher), "--feature_weight", "0.5",
             "--attention_weight", "0.5", "--kd_temperature", "2", "--kd_temperature_end", "1",
             "--kd_temperature_schedule", "cosine", "--per_device_train_batch_size", "2", "--logging_steps", "1",
             "--save_steps", "1", "--learning_rate", "1e-3", "--lr_scheduler_type", "constant", "--seed", "0",
             "--drop_long", "true",
             "--max_length", "256"]
    assert main([*flags, "--max_steps", "2"]) == 0
    metrics = json.loads((out / "sft_metrics.json").read_text())
    assert set(metrics["last_logged_parts"]) == {"ce", "kd", "feature", "attention", "kd_temperature"}
    logs = [h for h in metrics["log_history"] if "loss" in h]
    assert [h["kd_temperature"] for h in logs] == [2.0, 1.0]
    assert all(h["feature"] > 0 and h["attention"] > 0 and h["kd"] > 0 for h in logs)
    projection = torch.load(out / "checkpoint-2" / "feature_projection.pt", weights_only=True)
    assert {k: tuple(v.shape) for k, v in projection.items()} == {"1.weight": (128, 32)}
    first = torch.load(out / "checkpoint-1" / "feature_projection.pt", weights_only=True)
    assert not torch.equal(first["1.weight"], projection["1.weight"])  # it trains with the student
    assert not (out / "feature_projection.pt").exists()
    fresh = qwen2(AutoTokenizer.from_pretrained(narrow_student), 1, 32)
    assert set(load_file(str(out / "model.safetensors"))) <= set(fresh.state_dict())
    _, info = AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert not info["unexpected_keys"] and not info["missing_keys"]
    assert main([*flags, "--max_steps", "3"]) == 0  # resumes from checkpoint-2, projection and its Adam state
    metrics = json.loads((out / "sft_metrics.json").read_text())
    assert metrics["resumed_from"].endswith("checkpoint-2") and metrics["global_step"] == 3
    assert not torch.equal(torch.load(out / "checkpoint-3" / "feature_projection.pt", weights_only=True)["1.weight"],
                           projection["1.weight"])


def test_a_resumed_run_continues_from_the_saved_projection(tokenizer, tmp_path):
    student, teacher = qwen2(tokenizer, 1, 32), qwen2(tokenizer, 2, 48, seed=1)
    rows, _ = batch_of(tokenizer)
    d = distill(feature_weight=1.0)
    args = training_args(tmp_path, max_steps=2, save_strategy="steps", save_steps=2, learning_rate=0.1)
    DistillTrainer(model=student, args=args, train_dataset=rows, processing_class=tokenizer, distill=d,
                   teacher_model=teacher).train()
    saved = torch.load(tmp_path / "checkpoint-2" / "feature_projection.pt", weights_only=True)
    torch.manual_seed(123)  # another initial projection
    again = DistillTrainer(model=qwen2(tokenizer, 1, 32), args=args, train_dataset=rows, processing_class=tokenizer,
                           distill=d, teacher_model=teacher)
    assert not torch.equal(again.projection["1"].weight, saved["1.weight"])
    again.train(resume_from_checkpoint=str(tmp_path / "checkpoint-2"))
    torch.testing.assert_close(again.projection["1"].weight, saved["1.weight"], rtol=0, atol=0)
    assert len(again.optimizer.param_groups) == 3  # decay, no decay, the projection


def test_a_teacher_with_another_tokenizer_is_refused_naming_the_setting(toyworld, narrow_student, tmp_path, caplog):
    from sft.main import main

    other = tmp_path / "other-teacher"
    tokenizer = AutoTokenizer.from_pretrained(toyworld.teacher)
    tokenizer.add_tokens(["<extra>"])
    qwen2(tokenizer, 1).save_pretrained(other)
    tokenizer.save_pretrained(other)
    flags = ["--dataset", str(toyworld.gold), "--model_name_or_path", str(narrow_student), "--output_dir",
             str(tmp_path / "out"), "--kd", "online", "--teacher_models", str(toyworld.teacher), str(other),
             "--teacher_weights", "1", "1", "--max_steps", "1", "--max_length", "256", "--drop_long", "true"]
    assert main(flags) == 2
    assert "teacher_models: the student's tokenizer is not the teacher's" in caplog.text
    assert "1 only in the teacher" in caplog.text
    assert not (tmp_path / "out" / "model.safetensors").exists()


def test_gradient_checkpointing_gives_the_same_gradient(tokenizer, tmp_path):
    """Captured q/k and layer outputs of checkpointed layers still carry the gradient (recomputed in backward);
    reentrant checkpointing, which would drop it, is refused."""
    rows, _ = batch_of(tokenizer)
    d = distill(feature_weight=1.0, attention_weight=1.0, attention_layers=2)
    grads = []
    for checkpointing in (False, True):
        student, teacher = qwen2(tokenizer, 2, 32, seed=0), qwen2(tokenizer, 3, 48, seed=1)
        torch.manual_seed(7)  # the same projection
        trainer = DistillTrainer(model=student, args=training_args(tmp_path, gradient_checkpointing=checkpointing),
                                 train_dataset=rows, processing_class=tokenizer, distill=d, teacher_model=teacher)
        if checkpointing:  # as Trainer.train() does it (transformers 5 defaults to use_reentrant: false)
            student.gradient_checkpointing_enable(trainer.args.gradient_checkpointing_kwargs)
            assert student.is_gradient_checkpointing
        batch = trainer.data_collator([rows[i] for i in range(4)])
        student.train()
        trainer.compute_loss(student, batch).backward()
        grads.append({n: p.grad.clone() for n, p in student.named_parameters()})
    for name, grad in grads[0].items():
        torch.testing.assert_close(grads[1][name], grad, rtol=1e-5, atol=1e-7, msg=lambda m, n=name: f"{n}: {m}")
    with pytest.raises(ConfigError, match="^attention_weight: needs gradient_checkpointing_kwargs"):
        DistillTrainer(model=qwen2(tokenizer, 2), args=training_args(
            tmp_path, gradient_checkpointing=True, gradient_checkpointing_kwargs={"use_reentrant": True}),
            train_dataset=rows, processing_class=tokenizer, distill=d, teacher_model=qwen2(tokenizer, 2))


def test_alignment_composes_with_sparse_kd(tokenizer, tmp_path):
    """kd: sparse (the teacher's top-k from the batch) + feature + attention from an in-process teacher: each part
    is the one its own trainer computes, and the loss is their weighted sum."""
    rows = kd_rows(len(tokenizer), n=4)
    student, teacher = qwen2(tokenizer, 2, 32), qwen2(tokenizer, 3, 48, seed=1)
    both = distill(kd="sparse", kd_alpha=0.3, kd_temperature=2.0, feature_weight=0.5, attention_weight=0.25)
    trainer = trainer_for(student, teacher, tokenizer, tmp_path, both, rows)
    batch = trainer.data_collator([rows[i] for i in range(4)])
    loss, parts, tokens = trainer.loss_parts(student, batch)
    sparse = trainer_for(student, None, tokenizer, tmp_path, replace(both, feature_weight=0.0, attention_weight=0.0),
                         rows).loss_parts(student, batch)[1]
    aligned = trainer_for(student, teacher, tokenizer, tmp_path, replace(both, kd="none"), rows)
    aligned.projection = trainer.projection  # the same projection
    aligned = aligned.loss_parts(student, batch)[1]
    assert parts["ce"] == pytest.approx(sparse["ce"].item()) and parts["kd"] == pytest.approx(sparse["kd"].item())
    assert parts["feature"] == pytest.approx(aligned["feature"].item())
    assert parts["attention"] == pytest.approx(aligned["attention"].item())
    want = 0.3 * parts["ce"] + 0.7 * 4 * parts["kd"] + 0.5 * parts["feature"] + 0.25 * parts["attention"]
    assert loss.item() == pytest.approx(want.item(), rel=1e-5)
