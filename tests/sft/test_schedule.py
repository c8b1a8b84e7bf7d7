"""The KD temperature schedule: its values at the first, middle and last step, and real training runs (sparse and
online KD) that log the step's temperature and weigh the KD part by its square."""

import math

import pytest
from transformers import AutoTokenizer

from sft.config import ConfigError, DistillArguments
from sft.schedule import temperature_at
from sft.trainer import DistillTrainer
from tests.sft.tiny import kd_rows, tiny_model, training_args


def test_values_at_the_first_middle_and_last_step():
    steps = 5  # global steps 0..4; the middle is 2
    for schedule in ("linear", "cosine"):
        values = [temperature_at(s, steps, 4.0, 1.0, schedule) for s in range(steps)]
        assert values[0] == 4.0 and values[-1] == 1.0 and values[2] == pytest.approx(2.5)
        assert all(a > b for a, b in zip(values, values[1:], strict=False))  # decreasing from start to end
    assert temperature_at(1, steps, 4.0, 1.0, "linear") == pytest.approx(3.25)
    assert temperature_at(1, steps, 4.0, 1.0, "cosine") == pytest.approx(1 + 3 * (1 + math.cos(math.pi / 4)) / 2)
    assert [temperature_at(s, steps, 2.0, 1.0, "constant") for s in (0, 2, 4)] == [2.0, 2.0, 2.0]
    assert temperature_at(0, 1, 4.0, 1.0, "cosine") == 4.0  # one step: the start
    assert temperature_at(7, 5, 4.0, 1.0, "linear") == 1.0  # past the end (an eval after training): the end
    assert temperature_at(2, 5, 1.0, 3.0, "linear") == pytest.approx(2.0)  # rising works too


def test_schedule_settings_are_checked_naming_them():
    for bad, name in (({"kd_temperature_schedule": "step"}, "kd_temperature_schedule"),
                      ({"kd_temperature_schedule": "linear"}, "kd_temperature_end"),
                      ({"kd_temperature_end": 0.0}, "kd_temperature_end")):
        with pytest.raises(ConfigError, match=f"^{name}:"):
            DistillArguments(dataset="unused", kd="sparse", **bad)


@pytest.mark.parametrize("kd", ["sparse", "online"])
def test_training_logs_the_steps_temperature_and_weighs_kd_by_its_square(toyworld, tmp_path, kd):
    tokenizer = AutoTokenizer.from_pretrained(toyworld.tokenizer)
    rows = kd_rows(len(tokenizer), n=8)
    teacher = None
    if kd == "online":
        rows = rows.select_columns(["input_ids", "labels"])
        teacher = tiny_model(len(tokenizer), tokenizer.pad_token_id, seed=1, head_scale=8.0)
    distill = DistillArguments(dataset="unused", kd=kd, teacher_model="unused", kd_alpha=0.5, kd_temperature=4.0,
                               kd_temperature_end=1.0, kd_temperature_schedule="linear")
    trainer = DistillTrainer(model=tiny_model(len(tokenizer), tokenizer.pad_token_id),
                             args=training_args(tmp_path, per_device_train_batch_size=8, max_steps=5,
                                                learning_rate=0.1),
                             train_dataset=rows, processing_class=tokenizer, distill=distill, teacher_model=teacher)
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert [h["kd_temperature"] for h in logs] == pytest.approx([4.0, 3.25, 2.5, 1.75, 1.0])
    for h in logs:  # the logged loss is the weighted sum of the logged token means, at the step's T
        assert h["loss"] == pytest.approx(0.5 * h["ce"] + 0.5 * h["kd_temperature"] ** 2 * h["kd"], rel=2e-3, abs=2e-4)
