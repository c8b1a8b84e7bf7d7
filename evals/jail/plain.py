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

import hashlib
import json
import math

MAX_DEPTH = 200
_ITERATORS = {"map", "filter", "zip", "enumerate", "reversed", "generator", "list_iterator", "tuple_iterator",
              "range_iterator", "str_ascii_iterator", "str_iterator", "set_iterator", "dict_keyiterator",
              "dict_valueiterator", "dict_itemiterator", "dict_keys", "dict_values", "dict_items",
              "itertools.chain", "itertools.islice", "itertools.count"}  # fmt: skip
_TEXT = json.JSONEncoder(ensure_ascii=True, separators=(",", ":"), allow_nan=False)
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
    floats = []
    return _TEXT.encode(_encode(value, 0, floats)), bool(floats)


def digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def printed_digest(text: str) -> str:
    """digest of printed text with outer whitespace stripped and each line's whitespace runs collapsed."""
    return digest("\n".join(" ".join(line.split()) for line in text.strip().splitlines()))


def _encode(v, depth, floats):
    if depth > MAX_DEPTH:
        raise Unencodable(f"nested deeper than {MAX_DEPTH}")
    t = type(v)  # the real type: isinstance() would believe a forged __class__
    if v is None or t is bool:
        return v
    if issubclass(t, int):
        v = int.__add__(v, 0)
        return v if -(1 << 62) < v < 1 << 62 else {"I": hex(v)}
    if issubclass(t, float):
        floats.append(1)
        v = float.__mul__(v, 1.0)
        return v if math.isfinite(v) else {"F": repr(v)}
    if issubclass(t, complex):
        floats.append(1)
        return {"C": [_encode(complex.real.__get__(v), depth, floats), _encode(complex.imag.__get__(v), depth, floats)]}
    if issubclass(t, str):
        return str.__add__(v, "")
    if issubclass(t, (list, tuple)):
        items = [_encode(x, depth + 1, floats) for x in (list.__iter__ if issubclass(t, list) else tuple.__iter__)(v)]
        return items if issubclass(t, list) else {"T": items}
    if issubclass(t, (set, frozenset)):
        items = (set.__iter__ if issubclass(t, set) else frozenset.__iter__)(v)
        return {"S" if issubclass(t, set) else "FS": sorted((_encode(x, depth + 1, floats) for x in items),
                                                            key=_TEXT.encode)}
    if issubclass(t, dict):
        return {"D": [[_encode(k, depth + 1, floats), _encode(x, depth + 1, floats)] for k, x in dict.items(v)]}
    if issubclass(t, (bytes, bytearray)):
        return {"B" if issubclass(t, bytes) else "BA": (bytes.hex if issubclass(t, bytes) else bytearray.hex)(v)}
    if _type_name(t) in _ITERATORS:
        return [_encode(x, depth + 1, floats) for x in v]
    return {"O": [_type_name(t), bool(v) is True]}


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
