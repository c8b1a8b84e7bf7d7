"""Every recipe parses with its stage's own parser (unknown keys fail), and every accelerate config with
accelerate's, so a recipe cannot rot unnoticed."""

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
RECIPES = sorted(p for p in (ROOT / "recipes").glob("*/*.yaml") if p.parent.name != "accelerate")
ACCELERATE = sorted((ROOT / "recipes" / "accelerate").glob("*.yaml"))


def parse(recipe: Path, tmp_path: Path):
    stage = recipe.stem.split("-")[0]
    if stage == "tracegen":
        from tracegen.config import parse_config

        return parse_config(["--config", str(recipe)])
    if stage == "filter":
        from filter.config import parse_config

        return parse_config(["--config", str(recipe), "--run_dir", str(tmp_path)])  # the run does not exist here
    if stage == "sft":
        from sft.config import parse_config

        return parse_config(["--config", str(recipe), "--bf16", "false"])  # bf16 recipes are for GPUs
    if stage == "evals":
        from evals.config import parse_config

        return parse_config(["--config", str(recipe)])
    if stage == "prune":
        from sft.prune import parse_config

        return parse_config(["--config", str(recipe)])
    raise AssertionError(f"{recipe}: the file name must start with the stage it configures")


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_every_recipe_parses_with_its_stage_parser(recipe, tmp_path, monkeypatch):
    monkeypatch.setenv("DEEPSEEK_API_KEY", "set-for-the-test")
    assert parse(recipe, tmp_path) is not None


def test_a_recipe_with_an_unknown_key_fails(tmp_path):
    from data.config import ConfigError

    for stage in ("tracegen", "filter", "sft", "evals"):
        source = next(r for r in RECIPES if r.stem.startswith(stage))
        bad = tmp_path / f"{stage}-bad.yaml"
        bad.write_text(source.read_text() + "\nnot_a_setting: 1\n")
        with pytest.raises(ConfigError, match=r"unknown keys \['not_a_setting'\]"):
            parse(bad, tmp_path)


@pytest.mark.parametrize("config", ACCELERATE, ids=lambda p: p.name)
def test_accelerate_configs_load(config):
    from accelerate.commands.config.config_args import load_config_from_file

    loaded = load_config_from_file(str(config))
    assert loaded.num_processes == 8 and loaded.mixed_precision == "bf16"
