"""What every stage's command line shares: one parser for `--config file.yaml` plus `--field value` flags, the
two errors that end a run with exit 2 and a one-line message, and how a command runs (`run_command`).

    from data.config import ConfigError, InputError, documented, parse_config
    (cfg,) = parse_config([TracegenConfig], argv, prog="python -m tracegen")

ConfigError means a setting is wrong, InputError an input file; each message names the setting or the file
(and line). They are what a user fixes. Every other exception is a bug and keeps its traceback.

The parser is TRL's TrlParser (an HfArgumentParser: one flag per dataclass field; `env:` in the YAML sets
environment variables), plus the checks it lacks. They run before any config object is built, so a
__post_init__ only sees values of the right shape:
- the file exists and is a UTF-8 YAML mapping whose keys are all fields (a typo is named, not hidden behind
  the validation error it causes);
- every YAML value has its field's type: a list where a number is expected is an error naming the field,
  not a TypeError later. A string is accepted where argparse converts it ("3" for an int, 1e-4 for a float),
  and one string where a list is expected is a list of one (`benchmarks: toy` means `[toy]`);
- a list flag takes a YAML flow list as its one value: `--benchmarks '[a, b]'`, `--contamination_benchmarks '[]'`;
- argparse's own errors (a bad flag value, an unknown or abbreviated flag) are ConfigErrors.

It lives in data/ because no stage owns it: data/ is the package every stage imports and none runs, home of
the contracts between the stages (README.md).
"""

import dataclasses
import enum
import json
import logging
import os
import signal
import sys
import types
import typing
from pathlib import Path

import yaml


class ConfigError(Exception):
    """A setting is wrong; the message names it."""


class InputError(Exception):
    """An input file is wrong; the message names the file (and line)."""


def parse_config(config_types: list[type], argv: list[str] | None, prog: str, defaults: dict | None = None,
                 removed: dict[str, str] | None = None) -> tuple:
    """One instance of each dataclass in `config_types` from `--config file.yaml` and `--field value` flags
    (flags win). `defaults` replace the dataclasses' own; `removed` maps retired keys to what replaced them."""
    from trl import TrlParser  # light: only the parser, not the trainers

    argv = list(sys.argv[1:] if argv is None else argv)
    path = config_file(argv)
    if path:
        at = argv.index("--config")
        argv = argv[:at] + argv[at + 2:]
    fields = _fields(config_types)
    values = _read_yaml(path) if path else {}
    for name in [*values, *(a[2:].split("=", 1)[0] for a in argv if a.startswith("--"))]:
        if name in (removed or {}):
            raise ConfigError(f"{path if name in values else 'command line'}: {name}: removed; {removed[name]}")
    unknown = sorted(set(values) - set(fields) - {"env"})
    if unknown:
        raise ConfigError(f"{path}: unknown keys {unknown} (the settings: {prog} --help)")
    env = values.pop("env", {})
    if not isinstance(env, dict):
        raise ConfigError(f"{path}: env: expected a mapping of environment variables, got {_show(env)}")
    argv, flow = _flow_lists(argv, fields)
    values = {name: _checked(name, value, fields[name], path) for name, value in values.items()}
    values |= {name: _checked(name, value, fields[name], "command line") for name, value in flow.items()}

    parser = TrlParser(config_types, allow_abbrev=False, prog=prog)
    parser.error = lambda message: _raise(ConfigError(f"command line: {message}"))  # argparse would exit
    parser.set_defaults(**(defaults or {}))
    parser.set_defaults_with_config(**values)  # YAML values are defaults: flags win
    os.environ.update({key: str(value) for key, value in env.items()})
    _, stray = parser.parse_known_args(argv)  # named before any config is built (and validated)
    if stray:
        raise ConfigError(f"command line: unknown flags or extra values {stray} (the settings: {prog} --help)")
    try:
        return tuple(parser.parse_args_into_dataclasses(args=argv, look_for_args_file=False))
    except ValueError as e:  # a library's own check of a value (TrainingArguments)
        raise ConfigError(f"{path or 'command line'}: {e}") from None


def documented(text: str, **kw):
    """A config dataclass field with its help text, which `python -m <stage> --help` prints."""
    return dataclasses.field(metadata={"help": text}, **kw)


def config_file(argv: list[str]) -> str | None:
    """The path after `--config`, checked to exist; None without one."""
    if "--config" not in argv:
        return None
    at = argv.index("--config")
    if at + 1 >= len(argv) or argv[at + 1].startswith("--"):
        raise ConfigError("--config: needs a YAML file path")
    path = argv[at + 1]
    if not Path(path).is_file():
        raise ConfigError(f"--config: no such file: {path}")
    return path


# ----------------------------------------------------------------------------- helpers for __post_init__


def json_dict(name: str, value) -> dict | None:
    """A mapping field that may also come as JSON text (from a flag)."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as e:
            raise ConfigError(f"{name}: not a JSON object: {e}") from None
    if value is not None and not isinstance(value, dict):
        raise ConfigError(f"{name}: must be a mapping, got {type(value).__name__}")
    return value


def at_least(cfg, low, *names: str) -> None:
    """Every named field of `cfg` that is set (not None) is >= low."""
    for name in names:
        value = getattr(cfg, name)
        if value is not None and value < low:
            raise ConfigError(f"{name}: must be >= {low}, got {value}")


def save_config(path: Path, values: dict) -> None:
    """The resolved config next to what it made, written under a temp name and renamed."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(yaml.safe_dump(values, sort_keys=False))
    tmp.replace(path)


# ----------------------------------------------------------------------------- mechanics


def run_command(main, stage: str, interrupted: str, quiet_loggers: tuple[str, ...] = ()) -> None:
    """`python -m <stage>`: logs to stderr, a batch scheduler's SIGTERM handled as Ctrl-C, and on either a warning
    saying what an interrupted run keeps (`interrupted`), exit 130. Exits with main()'s return code."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    for name in quiet_loggers:
        logging.getLogger(name).setLevel(logging.WARNING)
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        logging.getLogger(stage).warning("interrupted; %s", interrupted)
        sys.exit(130)


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def _raise(error: Exception):
    raise error


def _fields(config_types: list[type]) -> dict[str, object]:
    """name -> type annotation of every field the parser fills."""
    fields = {}
    for config_type in config_types:
        hints = typing.get_type_hints(config_type)
        fields |= {f.name: hints[f.name] for f in dataclasses.fields(config_type) if f.init}
    return fields


def _read_yaml(path: str) -> dict:
    try:
        values = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not UTF-8 text (byte {e.start})") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {' '.join(str(e).split())}") from None
    if values is None:
        return {}
    if not isinstance(values, dict):
        raise ConfigError(f"{path}: must be a YAML mapping of setting: value, got {_show(values)}")
    return values


def _flow_lists(argv: list[str], fields: dict) -> tuple[list[str], dict]:
    """`--name '[a, b]'` for a list field: taken out of argv and returned as {name: [a, b]}."""
    rest, found, i = [], {}, 0
    while i < len(argv):
        flag, value, step = argv[i], None, 1
        name = flag[2:].split("=", 1)[0] if flag.startswith("--") else None
        if name in fields and _is_list(fields[name]):
            if "=" in flag:
                value = flag.split("=", 1)[1]
            elif i + 2 == len(argv) or (i + 2 < len(argv) and argv[i + 2].startswith("--")):
                value, step = argv[i + 1] if i + 1 < len(argv) else None, 2
        if value is not None and value.strip().startswith("["):
            try:
                found[name] = yaml.safe_load(value)
            except yaml.YAMLError:
                raise ConfigError(f"command line: --{name}: {value!r} is not a YAML list such as [a, b]") from None
            i += step
            continue
        rest.append(flag)
        i += 1
    return rest, found


def _is_list(kind) -> bool:
    options = typing.get_args(kind) if _is_union(kind) else (kind,)
    return any(typing.get_origin(k) is list or k is list for k in options) and str not in options


def _is_union(kind) -> bool:
    return typing.get_origin(kind) in (typing.Union, types.UnionType)


def _checked(name: str, value, kind, where: str):
    """`value` if it fits the field's type (one string for a list field becomes a list of one)."""
    if isinstance(value, str) and _is_list(kind):
        value = [value]
    if not _fits(value, kind):
        raise ConfigError(f"{where}: {name}: expected {_describe(kind)}, got {_show(value)}")
    return value


def _fits(value, kind) -> bool:
    if kind is typing.Any:
        return True
    if _is_union(kind):
        return any(_fits(value, k) for k in typing.get_args(kind))
    if kind is type(None):
        return value is None
    origin, args = typing.get_origin(kind), typing.get_args(kind)
    if origin is typing.Literal:
        return value in args
    if origin is list or kind is list:
        return isinstance(value, list) and all(_fits(v, args[0]) for v in value) if args else isinstance(value, list)
    if origin is dict or kind is dict:
        return isinstance(value, dict)
    scalar = isinstance(value, str | int | float) and not isinstance(value, bool)
    if kind is bool:
        return isinstance(value, bool | str)  # argparse reads "true"/"false"
    if kind is int:
        return scalar and not isinstance(value, float)
    if kind is float:
        return scalar
    if kind is str:
        return isinstance(value, str)
    if isinstance(kind, type) and issubclass(kind, enum.Enum):
        return isinstance(value, str | kind)  # the library checks the name
    return True  # a type this check does not know: the library behind it checks the value


def _describe(kind) -> str:
    if _is_union(kind):
        options = [k for k in typing.get_args(kind) if k is not type(None)]
        return " or ".join(_describe(k) for k in options) + (" or null" if len(options) < len(
            typing.get_args(kind)) else "")
    origin, args = typing.get_origin(kind), typing.get_args(kind)
    if origin is typing.Literal:
        return "one of " + ", ".join(map(str, args))
    if origin is list or kind is list:
        return f"a list of {_describe(args[0]).split(' ', 1)[1]}s" if args else "a list"
    names = {bool: "a boolean", int: "an integer", float: "a number", str: "a string", dict: "a mapping"}
    return names.get(origin or kind, f"a {getattr(kind, '__name__', kind)}")


def _show(value) -> str:
    kind = {list: "a list", dict: "a mapping", str: "the string", bool: "the boolean"}.get(type(value), "")
    text = json.dumps(value, default=str) if not isinstance(value, str) else repr(value)
    return f"{kind} {text[:80]}".strip()
