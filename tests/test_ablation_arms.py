"""recipes/ablation/run.py's arms: every arm's training command is one `python -m sft` accepts, as configured."""

from pathlib import Path

import pytest
import yaml

from data.config import ConfigError
from sft.config import parse_config
from tests.stages import recipe_module

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def ablation():
    return recipe_module(ROOT / "recipes" / "ablation" / "run.py")


def test_every_arms_sft_command_parses_and_the_on_policy_arm_scores_as_the_quickstart(ablation, tmp_path):
    run = tmp_path / "run"
    data = {name: run / name for name in ("curated", "unfiltered", "confident", "quarter", "half")}
    for arm in ablation.ARMS:
        sft, _ = ablation.commands(arm, 0, run, "base", data, ablation.SIZES["full"], tmp_path / "world")
        if sft[1:3] != ["-m", "sft"]:
            continue  # ptq-*: sft.quantize of the filtered checkpoint (tests/sft/test_qat_arms.py)
        args, training_args, _, _ = parse_config([str(c) for c in sft[3:]])
        assert training_args.max_steps == ablation.SIZES["full"]["steps"] and training_args.seed == 0, arm[0]
        if arm[0] == "on-policy":
            recipe = yaml.safe_load((ROOT / "recipes" / "quickstart" / "sft-filtered-on-policy.yaml").read_text())
            assert args.kd == "on_policy" and args.teacher_model == f"{run}/checkpoints/teacher"
            assert args.on_policy_top_k == recipe["on_policy_top_k"] and "teacher_serve_model" not in recipe


@pytest.mark.parametrize("value", ["--max-model-len 1024 --enforce-eager",
                                   '["--max-model-len", "1024", "--enforce-eager"]'])
def test_teacher_serve_args_read_shell_words_or_a_json_list(value):
    args = parse_config(["--model_name_or_path", "m", "--dataset", "d", "--kd", "on_policy", "--teacher_serve_model", "t",
                         "--teacher_serve_args", value])[0]
    assert args.teacher_serve_args == ["--max-model-len", "1024", "--enforce-eager"]


def test_a_broken_json_list_of_teacher_serve_args_is_named():
    with pytest.raises(ConfigError, match="teacher_serve_args: .* starts like a JSON list"):
        parse_config(["--model_name_or_path", "m", "--dataset", "d", "--kd", "on_policy", "--teacher_serve_model", "t",
                      "--teacher_serve_args", '["--max-model-len", 1024'])
