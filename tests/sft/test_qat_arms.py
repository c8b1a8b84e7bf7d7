"""The quantization arms: recipes/ablation/run.py's (their commands: PTQ quantizes the filtered checkpoint, QAT
trains like it and is evaluated converted), and recipes/quantization/run.py (QAT vs PTQ of one toy student) end to
end at tiny size (slow): the same stages and code path as the measured full run, a 200-problem world, 4 steps, 4
held-out problems. Asserts the plumbing: the eight models are the ones the table names, QAT and PTQ quantize with
the same config, and a rerun redoes nothing. The first run calls each stage's main() in this process
(tests/stages.py: fifteen launches would pay the torch imports fifteen times, most of the run); the rerun is the
real command."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

from tests.stages import in_process, recipe_module

ROOT = Path(__file__).resolve().parents[2]
MODELS = ("float", "ptq-int8", "ptq-int4", "qat-int8", "qat-int4", "qat-int8-float", "qat-int4-float", "float-s1")


def _args(run_dir: Path, world: Path) -> list[str]:
    return ["--size", "tiny", "--run_dir", str(run_dir), "--world", str(world)]


def _run(run_dir: Path, world: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "recipes/quantization/run.py", *_args(run_dir, world)], cwd=ROOT,
                          capture_output=True, text=True)


@pytest.fixture(scope="module")
def ablation():
    return recipe_module(ROOT / "recipes" / "ablation" / "run.py")


def _arm_commands(ablation, name: str, tmp_path: Path) -> tuple[list, list]:
    arm = next(a for a in ablation.ARMS if a[0] == name)
    data = {"curated": tmp_path / "run" / "curated"}
    return ablation.commands(arm, 1, tmp_path / "run", "base", data, ablation.SIZES["tiny"], tmp_path / "world")


def test_ablation_ptq_arms_quantize_the_filtered_checkpoint_of_their_seed(ablation, tmp_path):
    for scheme in ("int8", "int4"):
        quantize, evals = _arm_commands(ablation, f"ptq-{scheme}", tmp_path)
        checkpoints = tmp_path / "run" / "ablation" / "checkpoints"
        assert quantize[1:3] == ["-m", "sft.quantize"]
        assert quantize[quantize.index("--model") + 1] == str(checkpoints / "filtered-s1")
        assert quantize[quantize.index("--scheme") + 1] == scheme
        assert evals[evals.index("--model") + 1] == str(checkpoints / f"ptq-{scheme}-s1")
    assert {a[0] for a in ablation.ARMS if a[1] == "quantization"} == {"ptq-int8", "ptq-int4", "qat-int8", "qat-int4"}


def test_ablation_qat_arms_train_like_filtered_and_evaluate_the_converted_model(ablation, tmp_path):
    filtered, _ = _arm_commands(ablation, "filtered", tmp_path)
    sft, evals = _arm_commands(ablation, "qat-int4", tmp_path)
    out = str(tmp_path / "run" / "ablation" / "checkpoints" / "qat-int4-s1")
    assert sft[sft.index("--qat") + 1] == "int4" and sft[sft.index("--output_dir") + 1] == out
    assert [c for c in sft if c not in ("--qat", "int4")] == [c.replace("filtered-s1", "qat-int4-s1") for c in filtered]
    assert evals[evals.index("--model") + 1] == f"{out}/quantized"


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    base = tmp_path_factory.mktemp("quantization")
    recipe = recipe_module(ROOT / "recipes" / "quantization" / "run.py")
    assert recipe.main(_args(base / "run", base / "world"), call=in_process) == 0
    return base


@pytest.mark.slow
def test_every_model_is_scored_with_the_protocol_and_tabled(run):
    scores = json.loads((run / "run" / "evals" / "scores.json").read_text())
    assert set(scores) == set(MODELS)
    table = (run / "run" / "results.md").read_text()
    for name in MODELS:
        toy = scores[name]["toy"]
        assert toy["num_samples"] == toy["n"] * toy["num_problems"] == 4
        assert toy["protocol"]["temperature"] == 0.6
        assert f"| {name} | " in table
    assert "| QAT vs PTQ, int4 | qat-int4 - ptq-int4 |" in table
    assert table.count("-m evals") == len(MODELS)


@pytest.mark.slow
def test_ptq_and_qat_quantize_alike_into_smaller_int8_stored_weights(run):
    checkpoints = run / "run" / "checkpoints"
    for scheme in ("int8", "int4"):
        ptq = json.loads((checkpoints / f"ptq-{scheme}" / "quantize.json").read_text())
        qat = json.loads((checkpoints / f"qat-{scheme}" / "quantized" / "quantize.json").read_text())
        assert ptq["source"] == str((checkpoints / "float").resolve())
        assert (ptq["scheme"], ptq["backend"], ptq["preset"]) == (qat["scheme"], qat["backend"], qat["preset"])
        assert ptq["stored_dtypes"] == qat["stored_dtypes"] and "I8" in ptq["stored_dtypes"]
        assert ptq["weights_bytes_after"] == qat["weights_bytes_after"] < ptq["weights_bytes_before"]
        assert "check" in ptq  # the rounding's cost measured on the gold conversations


@pytest.mark.slow
def test_qat_training_differs_from_the_float_student_only_by_fake_quantization(run):
    """Same data, steps, seed and architecture: the int4 run's attention and MLP weights moved differently (its
    forward saw rounded weights)."""
    checkpoints = run / "run" / "checkpoints"
    plain, qat = (load_file(checkpoints / name / "model.safetensors") for name in ("float", "qat-int4"))
    assert plain.keys() == qat.keys()
    changed = [k for k in plain if not (plain[k] == qat[k]).all()]
    assert any("mlp" in k for k in changed) and any("self_attn" in k for k in changed)
    assert json.loads((checkpoints / "float" / "config.json").read_text()) == json.loads(
        (checkpoints / "qat-int4" / "config.json").read_text())


@pytest.mark.slow
def test_a_rerun_trains_quantizes_and_evaluates_nothing_again(run):
    scores = (run / "run" / "evals" / "scores.json").read_text()
    again = _run(run / "run", run / "world")
    assert again.returncode == 0, again.stdout[-4000:] + again.stderr[-4000:]
    assert "=== sft" not in again.stdout and "=== evals" not in again.stdout
    assert (run / "run" / "evals" / "scores.json").read_text() == scores
