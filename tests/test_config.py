"""The stages' one parser (data/config.py), through each stage's real main(): a value of the wrong shape, a
broken config file or a bad flag is one line naming the file and the setting, and exit 2."""

import logging
import os

import pytest


def stage_main(stage: str):
    if stage == "tracegen":
        from tracegen.main import main
    elif stage == "filter":
        from filter.main import main
    elif stage == "sft":
        from sft.main import main
    else:
        from evals.main import main
    return main


@pytest.mark.parametrize("stage, line, message", [
    ("tracegen", "n: [1, 2]", "n: expected an integer, got a list [1, 2]"),
    ("tracegen", "problems: [a, b]", 'problems: expected a string or null, got a list ["a", "b"]'),
    ("filter", "max_per_problem: [1, 2]", "max_per_problem: expected an integer or null, got a list [1, 2]"),
    ("filter", "run_dir: [a]", 'run_dir: expected a string or null, got a list ["a"]'),
    ("sft", "kd_alpha: [1]", "kd_alpha: expected a number, got a list [1]"),
    ("evals", "n: [4]", "n: expected an integer, got a list [4]"),
    ("evals", "temperature: [0.6]", "temperature: expected a number, got a list [0.6]"),
    ("evals", "output_dir: [out]", 'output_dir: expected a string or null, got a list ["out"]'),
])
def test_a_list_where_a_scalar_is_expected_is_named(tmp_path, caplog, stage, line, message):
    config = tmp_path / f"{stage}.yaml"
    config.write_text(line + "\n")  # checked before anything else is: the other settings do not matter
    caplog.set_level(logging.ERROR)
    assert stage_main(stage)(["--config", str(config)]) == 2
    assert [r.getMessage() for r in caplog.records] == [f"{config}: {message}"]


@pytest.mark.parametrize("content, message", [
    (b"n: 2\nproblems: caf\xe9.jsonl\n", "c.yaml: not UTF-8 text (byte 18)"),
    (b"- n: 2\n", "c.yaml: must be a YAML mapping of setting: value, got a list"),
    (b"n: [2\n", "c.yaml: not valid YAML: while parsing a flow sequence"),
    (b"n: 2\nnn: 3\n", "c.yaml: unknown keys ['nn'] (the settings: python -m tracegen --help)"),
    (b"env: [A]\n", "c.yaml: env: expected a mapping of environment variables"),
], ids=["not-utf8", "not-a-mapping", "not-yaml", "unknown-key", "env-not-a-mapping"])
def test_a_broken_config_file_is_named(tmp_path, caplog, content, message):
    from tracegen.main import main

    (tmp_path / "c.yaml").write_bytes(content)
    assert main(["--config", str(tmp_path / "c.yaml")]) == 2
    assert message in caplog.text


@pytest.mark.parametrize("flags, message", [
    (["--config"], "--config: needs a YAML file path"),
    (["--config", "missing.yaml"], "--config: no such file: missing.yaml"),
    (["--n", "two"], "command line: argument --n: invalid int value: 'two'"),
    (["--temp", "1"], "command line: unknown flags or extra values ['--temp', '1'] (the settings: python -m tracegen"),
    (["--n", "1", "2"], "command line: unknown flags or extra values ['2']"),
    (["--base_url", "[1, 2]"], "command line: base_url: expected a list of strings or null, got a list [1, 2]"),
])
def test_a_bad_flag_is_named(caplog, flags, message):
    from tracegen.main import main

    assert main(["--problems", "p.jsonl", "--output_dir", "out", *flags]) == 2
    assert message in caplog.text


def test_yaml_values_strings_and_flow_list_flags_reach_the_config(tmp_path, monkeypatch):
    from tracegen.config import parse_config

    monkeypatch.setenv("FROM_YAML", "before")  # restored after the test
    (tmp_path / "c.yaml").write_text("problems: p.jsonl\noutput_dir: out\nbase_url: http://h:1/v1\n"
                                     "temperature: 1e-1\nenv: {FROM_YAML: x}\n")  # YAML reads 1e-1 as a string
    cfg = parse_config(["--config", str(tmp_path / "c.yaml"), "--n", "3"])
    assert (cfg.base_url, cfg.temperature, cfg.n) == (["http://h:1/v1"], 0.1, 3)  # one URL is a list of one
    assert os.environ["FROM_YAML"] == "x"
    cfg = parse_config(["--config", str(tmp_path / "c.yaml"), "--base_url", "[http://a:1/v1, http://b:1/v1]"])
    assert cfg.base_url == ["http://a:1/v1", "http://b:1/v1"]
    cfg = parse_config(["--config", str(tmp_path / "c.yaml"), "--base_url", "http://a:1/v1", "http://b:1/v1"])
    assert cfg.base_url == ["http://a:1/v1", "http://b:1/v1"]
