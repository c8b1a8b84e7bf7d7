"""The quickstart (recipes/quickstart/run.py) end to end at CI size: the same stages and code path as
`make quickstart`, fewer problems and steps, each stage's main() called in this process (tests/stages.py: the
launches' imports were minutes of the run). Asserts the pipeline's invariants, not accuracies."""

import json
from pathlib import Path

import datasets
import duckdb
import pytest

from tests.stages import in_process, recipe_module

ROOT = Path(__file__).resolve().parents[1]
STUDENTS = ("unfiltered", "filtered-full", "filtered-lora", "filtered-kd", "filtered-on-policy")
MODELS = ("teacher", "student-base", *STUDENTS, "filtered-full-int8")
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def run(tmp_path_factory, recipe):
    base = tmp_path_factory.mktemp("quickstart")
    run_dir = base / "run"
    assert recipe.main(["--size", "ci", "--run_dir", str(run_dir), "--world", str(base / "world"), "--bases",
                        str(base / "bases")], call=in_process) == 0
    return run_dir


@pytest.fixture(scope="module")
def recipe():
    return recipe_module(ROOT / "recipes" / "quickstart" / "run.py")


def test_report_has_every_section_and_plot(run):
    report = (run / "report.md").read_text()
    for section in ("## Models on the held-out split", "## Curation funnel", "## Teacher traces", "## Training",
                    "## Time per stage", "## Plots"):
        assert section in report
    for plot in ("accuracy.png", "trace_length.png", "pass_rate_by_difficulty.png"):
        assert (run / plot).stat().st_size > 1000 and f"]({plot})" in report
    for model in MODELS:
        assert f"| {model} |" in report
    assert "| filtering (filtered vs unfiltered traces) | filtered-full - unfiltered |" in report
    assert "| sparse KD vs plain SFT (both filtered) | filtered-kd - filtered-full |" in report
    assert "| on-policy KD vs plain SFT (both filtered) | filtered-on-policy - filtered-full |" in report


def test_counts_line_up_across_stages(run):
    summary = json.loads((run / "tracegen.summary.json").read_text())
    assert summary["samples_done"] == summary["samples_expected"] == summary["problems"] * summary["n"]
    funnel = json.loads((run / "curated" / "funnel.json").read_text())
    assert funnel["rows_in"] == summary["samples_done"]
    assert funnel["rows_in"] - sum(r["first_applicable"] for r in funnel["rules"]) == funnel["kept"]
    curated = datasets.load_dataset("parquet", data_files=str(run / "curated" / "*.parquet"), split="train")
    unfiltered = datasets.load_dataset("parquet", data_files=str(run / "unfiltered" / "*.parquet"), split="train")
    assert len(curated) == funnel["exported"] <= funnel["kept"] and len(unfiltered) > len(curated)
    assert len(curated) >= 30  # the seeded CI teacher solves enough: a margin above an empty curated set
    with duckdb.connect(str(run / "curation.duckdb"), read_only=True) as con:
        kept = con.sql("SELECT trace_id FROM curated").fetchall()
        verdicts = dict(con.sql("SELECT trace_id, verdict FROM verified").fetchall())
    assert len(kept) == funnel["kept"]
    assert set(curated["trace_id"]) <= {t for (t,) in kept}
    assert {verdicts[t] for t in curated["trace_id"]} == {"correct"}  # every kept trace is verified
    assert all(ids for ids in curated["completion_token_ids"])  # the teacher's tokens ride along for KD


def test_every_model_is_scored_with_its_protocol(run):
    scores = json.loads((run / "evals" / "scores.json").read_text())
    assert set(scores) == set(MODELS)
    for name in MODELS:
        toy = scores[name]["toy"]
        assert toy["num_samples"] == toy["n"] * toy["num_problems"]
        assert {"temperature", "top_p", "max_tokens", "grader"} <= set(toy["protocol"])
        assert 0.0 <= toy["pass@1"] <= toy["pass@k"] <= 1.0
    assert (run / "checkpoints" / "filtered-lora" / "adapter_config.json").is_file()
    quantized = json.loads((run / "checkpoints" / "filtered-full-int8" / "quantize.json").read_text())
    assert quantized["scheme"] == "int8" and quantized["check"] is not None  # measured on the curated set
    weights = {name: scores[name]["toy"]["efficiency"]["weights_bytes"] for name in MODELS}  # cost beside accuracy
    assert 0 < weights["filtered-full-int8"] < weights["filtered-full"] < weights["teacher"]
    timings = json.loads((run / "timings.json").read_text())
    assert {"world", "sft teacher", "tracegen", "filter"} <= set(timings)


def test_students_start_from_the_pretrained_base_with_equal_steps(run, recipe):
    base = json.loads((run / "student-base.json").read_text())
    assert not base["cached"] and Path(base["path"]).name.startswith("student-base-")
    metrics = json.loads((Path(base["path"]) / "sft_metrics.json").read_text())
    assert metrics["global_step"] == recipe.SIZES["ci"]["base_steps"]
    steps = {name: json.loads((run / "checkpoints" / name / "sft_metrics.json").read_text())["global_step"]
             for name in STUDENTS}
    assert set(steps.values()) == {recipe.SIZES["ci"]["student_steps"]}, steps
    on_policy = json.loads((run / "checkpoints" / "filtered-on-policy" / "sft_metrics.json").read_text())
    assert any("kd_on_policy" in entry for entry in on_policy["log_history"])  # it trained on its own samples
    adapter = json.loads((run / "checkpoints" / "filtered-lora" / "adapter_config.json").read_text())
    assert Path(adapter["base_model_name_or_path"]).resolve() == Path(base["path"]).resolve()
    assert recipe.STUDENTS == STUDENTS


def test_the_base_is_reused_from_the_cache(run, recipe):
    """Same corpus, init, recipe, steps and code: the same folder, and nothing is trained again."""
    base = Path(json.loads((run / "student-base.json").read_text())["path"])
    world = run.parent / "world"
    before = (base / "model.safetensors").stat().st_mtime_ns

    def stage(name, *cmd):
        raise AssertionError(f"the cached base was trained again: {name}")

    assert recipe.student_base(world, recipe.SIZES["ci"], base.parent, stage) == (base, True)
    assert (base / "model.safetensors").stat().st_mtime_ns == before
    other = {**recipe.SIZES["ci"], "base_steps": recipe.SIZES["ci"]["base_steps"] + 1}
    assert recipe.base_key(world, other) != recipe.base_key(world, recipe.SIZES["ci"])
