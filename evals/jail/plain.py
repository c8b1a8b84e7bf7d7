"""Plain data: the only form in which a value leaves the sandbox.

`dumps(value)` turns None, bool, int, float, complex, str, bytes, bytearray, list, tuple, set,
frozenset and dict, nested, into canonical JSON text; `loads(text)` rebuilds the value from builtin
types only. A subclass of one of these (Counter, a namedtuple, an int with a custom `__eq__`) crosses
as its builtin content, read with the builtin type's own methods: its methods stay behind, so a
custom `__eq__` cannot answer a comparison outside. Built-in iterators (map, zip, generators, ...)
are read out and cross as lists. Anything else crosses as an `Opaque` value: its type name and truth
value, equal to nothing. Set items are sorted by their own text, so equal sets give equal text; dicts
keep their order (it shows when iterated), so equal dicts in another order are equal once rebuilt.
"""

import json
import math

try:  # not hashlib: it loads OpenSSL, a third of a sandbox run's start-up
    from _sha256 import sha256
except ImportError:  # Python 3.12+
    from _sha2 import sha256

MAX_DEPTH = 200
_ITERATORS = {"map", "filter", "zip", "enumerate", "reversed", "generator", "list_iterator", "tuple_iterator",
              "range_iterator", "str_ascii_iterator", "str_iterator", "set_iterator", "dict_keyiterator",
              "dict_valueiterator", "dict_itemiterator", "dict_keys", "dict_values", "dict_items",
              "itertools.chain", "itertools.islice", "itertools.count"}  # fmt: skip
_TEXT = json.JSONEncoder(ensure_ascii=True, separators=(",", ":"), allow_nan=False)
_SCALARS = {str, int, float, bool, type(None)}
OPAQUE_TAG = '{"O":'  # only a tag can hold this: inside a JSON string the quotes are escaped


class Unencodable(Exception):
    pass


class Opaque:
    """A value that was not plain data: only its type name and truth value crossed. Equal to nothing."""

    __slots__ = ("type_name", "truth")

    def __init__(self, type_name: str, truth: bool):
        self.type_name, self.truth = type_name, truth

    def __bool__(self) -> bool:
        return self.truth

    def __repr__(self) -> str:
        return f"<{self.type_name}>"


def dumps(value) -> tuple[str, bool]:
    """(canonical JSON text of `value`, whether it holds a float or complex)."""
    text, _, floats = wire(value, None)
    return text, floats


def wire(value, hash_over: int | None, float_hash_over: int | None = None) -> tuple[str | None, str | None, bool]:
    """(text, None, floats), or (None, sha256 of the text, floats) once the text passes `hash_over`
    characters (`float_hash_over` once a float was seen: floats are compared with a tolerance, which
    needs the values): written piece by piece, so a huge output never exists twice in memory."""
    sink = _Sink(hash_over, float_hash_over)
    _write(value, 0, sink)
    if sink.sha is None:
        return "".join(sink.parts), None, sink.floats
    return None, sink.sha.hexdigest(), sink.floats


def digest(text: str) -> str:
    return sha256(text.encode()).hexdigest()


def printed_digest(text: str) -> str:
    """digest of printed text with outer whitespace stripped and each line's whitespace runs collapsed."""
    return digest("\n".join(" ".join(line.split()) for line in text.strip().splitlines()))


class _Sink:
    def __init__(self, hash_over: int | None, float_hash_over: int | None = None):
        self.hash_over, self.float_hash_over = hash_over, float_hash_over or hash_over
        self.parts, self.size, self.sha, self.floats = [], 0, None, False

    def write(self, piece: str) -> None:
        self.size += len(piece)
        if self.sha is not None:
            self.sha.update(piece.encode())
            return
        self.parts.append(piece)
        if self.hash_over is not None and self.size > (self.float_hash_over if self.floats else self.hash_over):
            self.sha = sha256("".join(self.parts).encode())
            self.parts = []


def _write(v, depth: int, sink: _Sink) -> None:
    if depth > MAX_DEPTH:
        raise Unencodable(f"nested deeper than {MAX_DEPTH}")
    t = type(v)  # the real type: isinstance() would believe a forged __class__
    if v is None or t is bool:
        sink.write("null" if v is None else "true" if v else "false")
    elif issubclass(t, int):
        v = int.__add__(v, 0)
        sink.write(str(v) if -(1 << 62) < v < 1 << 62 else f'{{"I":"{hex(v)}"}}')
    elif issubclass(t, float):
        sink.floats = True
        v = float.__mul__(v, 1.0)
        sink.write(repr(v) if math.isfinite(v) else f'{{"F":"{v!r}"}}')
    elif issubclass(t, complex):
        sink.floats = True
        real, imag = _small(complex.real.__get__(v)), _small(complex.imag.__get__(v))
        sink.write(f'{{"C":[{real},{imag}]}}')
    elif issubclass(t, str):
        sink.write(_TEXT.encode(str.__add__(v, "")))
    elif (t is list or t is tuple) and _flat(v, sink):
        pass
    elif issubclass(t, (list, tuple)) or _type_name(t) in _ITERATORS:
        items = list.__iter__(v) if issubclass(t, list) else tuple.__iter__(v) if issubclass(t, tuple) else v
        sink.write("[" if issubclass(t, list) or not issubclass(t, tuple) else '{"T":[')
        for i, x in enumerate(items):
            if i:
                sink.write(",")
            _write(x, depth + 1, sink)
        sink.write("]" if issubclass(t, list) or not issubclass(t, tuple) else "]}")
    elif issubclass(t, (set, frozenset)):
        items = sorted(_small(x, depth + 1, sink) for x in (set.__iter__ if issubclass(t, set) else frozenset.__iter__)(v))
        sink.write(('{"S":[' if issubclass(t, set) else '{"FS":[') + ",".join(items) + "]}")
    elif issubclass(t, dict):
        sink.write('{"D":[')
        for i, (k, x) in enumerate(dict.items(v)):
            sink.write(",[" if i else "[")
            _write(k, depth + 1, sink)
            sink.write(",")
            _write(x, depth + 1, sink)
            sink.write("]")
        sink.write("]}")
    elif issubclass(t, (bytes, bytearray)):
        tag, hexed = ("B", bytes.hex(v)) if issubclass(t, bytes) else ("BA", bytearray.hex(v))
        sink.write(f'{{"{tag}":"{hexed}"}}')
    else:
        truth = "true" if bool(v) is True else "false"
        sink.write(f'{{"O":[{_TEXT.encode(_type_name(t))},{truth}]}}')


def _flat(v, sink: _Sink) -> bool:
    """Write a list or tuple of scalars in one go (json's C encoder, same text); False if it is not one."""
    kinds = set(map(type, v))
    if not kinds <= _SCALARS:
        return False
    try:
        text = _TEXT.encode(v if type(v) is list else list(v))
    except ValueError:  # nan or inf (tagged), or an int over sys.int_max_str_digits
        return False
    sink.floats = sink.floats or float in kinds
    sink.write(text if type(v) is list else f'{{"T":{text}}}')
    return True


def _small(v, depth: int = 0, outer: _Sink | None = None) -> str:
    """The text of a set item or complex part (kept whole: set items are sorted by it)."""
    sink = _Sink(None)
    _write(v, depth, sink)
    if outer is not None:
        outer.floats = outer.floats or sink.floats
    return "".join(sink.parts)


def _type_name(t) -> str:
    return t.__name__ if t.__module__ == "builtins" else f"{t.__module__}.{t.__name__}"


def loads(text: str):
    return _decode(json.loads(text))


def _decode(o):
    if isinstance(o, list):
        return [_decode(x) for x in o]
    if not isinstance(o, dict):
        return o
    [(tag, body)] = o.items()
    if tag == "I":
        return int(body, 16)
    if tag == "F":
        return float(body)
    if tag == "C":
        return complex(_decode(body[0]), _decode(body[1]))
    if tag == "T":
        return tuple(_decode(x) for x in body)
    if tag in ("S", "FS"):
        return (set if tag == "S" else frozenset)(_decode(x) for x in body)
    if tag == "D":
        return {_decode(k): _decode(x) for k, x in body}
    if tag in ("B", "BA"):
        return (bytes if tag == "B" else bytearray).fromhex(body)
    if tag == "O":
        return Opaque(str(body[0]), bool(body[1]))
    raise ValueError(f"unknown plain-data tag {tag!r}")
