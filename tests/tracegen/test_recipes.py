from pathlib import Path

import pytest

from tracegen.config import parse_config

RECIPES = sorted((Path(__file__).resolve().parents[2] / "recipes").glob("*/tracegen.yaml"))


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.parent.name)
def test_every_tracegen_recipe_parses(recipe, monkeypatch):
    monkeypatch.setenv("DEEPSEEK_API_KEY", "set-for-the-test")
    cfg = parse_config(["--config", str(recipe)])
    assert cfg.output_dir.startswith("runs/")
    if cfg.prompt_template:
        assert (Path(__file__).resolve().parents[2] / cfg.prompt_template).is_file()
