"""`python -m <stage> --help` prints every setting of every stage (argparse %-formats help strings: a stray `%`
in one crashes the whole page, as `{% generation %}` once did in sft's)."""

import dataclasses
import importlib

import pytest

STAGES = {"tracegen": "TracegenConfig", "filter": "FilterConfig", "sft": "DistillArguments", "evals": "EvalsConfig"}


@pytest.mark.parametrize("stage", STAGES)
def test_help_lists_every_setting(stage, capsys):
    main = importlib.import_module(f"{stage}.main").main
    config = getattr(importlib.import_module(f"{stage}.config"), STAGES[stage])
    with pytest.raises(SystemExit) as exit_:
        main(["--help"])
    assert exit_.value.code == 0
    page = capsys.readouterr().out
    assert page.startswith(f"usage: python -m {stage}")
    missing = [f.name for f in dataclasses.fields(config) if f"--{f.name} " not in page]
    assert not missing, f"{stage} --help lacks {missing}"
    if stage == "sft":  # TRL's own settings are on the same page
        assert "--learning_rate" in page and "--lora_r" in page and "{% generation %}" in page
