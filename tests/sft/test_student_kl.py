"""recipes/quickstart/student_kl.py: the exact reverse KL of a student's own completions against the teacher."""

from pathlib import Path

import pytest
import torch

from tests.sft.tiny import tiny_model
from tests.stages import recipe_module

SCRIPT = Path(__file__).resolve().parents[2] / "recipes" / "quickstart" / "student_kl.py"


@pytest.fixture(scope="module")
def student_kl():
    return recipe_module(SCRIPT)


def test_the_reverse_kl_is_zero_for_the_teacher_itself_and_the_dense_sum_otherwise(student_kl):
    teacher, student = tiny_model(40, 0, seed=1, head_scale=4.0), tiny_model(40, 0, seed=2, head_scale=4.0)
    prompts, completions = [[3, 4, 5], [6, 7]], [[8, 9, 10, 11], [12]]
    kl, tokens = student_kl.reverse_kl(teacher, teacher, prompts, completions)
    assert tokens == 5 and kl == pytest.approx(0.0, abs=1e-6)
    kl, _ = student_kl.reverse_kl(student, teacher, prompts, completions)
    want = 0.0
    for prompt, completion in zip(prompts, completions, strict=True):
        ids = torch.tensor([prompt + completion])
        for t in range(len(prompt), ids.shape[1]):  # the distribution that chose the token at t
            log_s = student(ids[:, :t]).logits[0, -1].double().log_softmax(-1)
            log_t = teacher(ids[:, :t]).logits[0, -1].double().log_softmax(-1)
            want += (log_s.exp() * (log_s - log_t)).sum().item()
    assert kl == pytest.approx(want, rel=1e-4) and kl > 0
