"""Limits on the shape of data the runner decodes: one definition, used at every decoder.

Everything the runner reads from the outside (records from a PDS or a relay, firehose frames,
answers from workers, XRPC and gateway bodies, DID documents) is decoded by code that recurses
(``json``, libipld, pydantic). Past about a thousand levels those raise ``RecursionError``,
which is not an error of ours and, before these limits, stopped the runner. So:

- ``MAX_DEPTH`` nesting levels at most, everywhere a JSON or DAG-CBOR value comes in. The
  outermost object or list is level 1; a scalar inside it is not a level.
- Past the limit the value is refused with ``Malformed``, which names where (a path such as
  ``args.a[3]``) and the limit. Nothing here raises ``RecursionError``: depth is measured without
  recursion, and decoders that recurse are called only on input whose depth is known, or with
  their ``RecursionError`` translated.

``MAX_DEPTH`` is well under what every recursive encoder on the path takes (pydantic
serialization stops near 255, CPython's json near 1000, libipld near 1000), so a value that
passes here can always be stored, sent to a worker and written back to a PDS.
"""

from __future__ import annotations

import json
import re
from typing import Any

import libipld

from atrund.errors import Malformed

MAX_DEPTH = 128


def step(path: str, key: Any) -> str:
    """``path`` one level down: ``a.b`` for a key, ``a[3]`` for an index (how messages name a place)."""
    if isinstance(key, int):
        return f"{path}[{key}]"
    return f"{path}.{key}" if path else str(key)


_NESTED = {dict, list, tuple}


def _deeper_than(value: Any, limit: int) -> bool:
    """Whether ``value`` nests deeper than ``limit`` levels: one level of containers at a time,
    in comprehensions (this runs on every answer, record and frame, so it is the fast path)."""
    level, depth = [value], 1
    while level:
        if depth > limit:
            return True
        level = [c for node in level for c in (node.values() if type(node) is dict else node) if type(c) in _NESTED]
        depth += 1
    return False


def too_deep(value: Any, limit: int = MAX_DEPTH) -> str | None:
    """The path of the first container nested deeper than ``limit`` levels, else None.

    Iterative, so any depth is measured without recursing. The path is looked for only when the
    fast measure (_deeper_than) says there is one. Containers are JSON's own types (dict, list;
    tuple): what json, libipld and pydantic produce."""
    if type(value) not in _NESTED or not _deeper_than(value, limit):
        return None
    stack: list[tuple[Any, int, Any]] = [(value, 1, None)]  # (container, level, (parent entry, key))
    while stack:
        entry = stack.pop()
        node, depth, _ = entry
        if depth > limit:
            keys = []
            while entry[2] is not None:
                entry, key = entry[2]
                keys.append(key)
            path = ""
            for key in reversed(keys):
                path = step(path, key)
            return path or "(top level)"
        for key, child in node.items() if isinstance(node, dict) else enumerate(node):
            if isinstance(child, (dict, list, tuple)):
                stack.append((child, depth + 1, (entry, key)))
    return None


def _too_deep_message(what: str, where: str, limit: int) -> str:
    if len(where) > 60:  # the path of a very deep value is long: its start says where it is
        where = where[:60] + "…"
    at = "" if where == "(top level)" else f" at {where}"
    return f"{what} is nested deeper than {limit} levels{at} (the limit)"


def check_depth(value: Any, what: str, limit: int = MAX_DEPTH) -> Any:
    """``value``, unless it nests deeper than ``limit``: then Malformed naming ``what`` and where."""
    where = too_deep(value, limit)
    if where is not None:
        raise Malformed(_too_deep_message(what, where, limit))
    return value


def check_fields(record: Any, limit: int = MAX_DEPTH) -> Any:
    """check_depth for a record (the record itself is level 1), naming the field that nests too
    deep: ``args is nested deeper than 128 levels at args.a.a… (the limit)``."""
    where = too_deep(record, limit)
    if where is not None:
        field = re.split(r"[.\[]", where, maxsplit=1)[0] if where != "(top level)" else ""
        raise Malformed(_too_deep_message(field or "the record", where, limit))
    return record


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _finite(text: str) -> float:
    value = float(text)
    if value in (float("inf"), float("-inf")):  # 1e999: JSON text, but no number anything can hold
        raise ValueError(f"{text[:40]} is out of range")
    return value


def _json(data: bytes | str, what: str) -> Any:
    try:
        return json.loads(data, parse_constant=_no_constant, parse_float=_finite)
    except ValueError as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise Malformed(f"{what} is not JSON: {e}") from None


def loads(data: bytes | str, what: str, limit: int = MAX_DEPTH, *, cut: bool = False) -> Any:
    """JSON text as a value, refused (Malformed, naming ``what``) if it is not strict JSON
    (``NaN`` and ``Infinity`` are not) or nests deeper than ``limit``.

    ``cut``: instead of refusing a value that nests too deep, return it with every object and
    list at level ``limit + 1`` emptied (see ``cut_json``). For answers that hold many values
    (a page of records), where one too-deep value must not cost the others: the cut one is
    still one level too deep, so ``check_depth`` on it later names where.
    """
    try:
        value = _json(data, what)
    except RecursionError:
        pass  # deeper than json can go: cut below, which also finds where
    else:
        if too_deep(value, limit) is None:
            return value
    if isinstance(data, bytes):
        try:
            data = data.decode("utf-8")
        except UnicodeDecodeError as e:
            raise Malformed(f"{what} is not JSON: {e}") from None
    try:
        value = _json(cut_json(data, limit, what), what)
    except RecursionError:  # only if the caller's own stack is nearly used up: a cut value is shallow
        raise Malformed(f"{what} is nested too deep to decode here") from None
    if not cut:
        check_depth(value, what, limit)  # the cut value is still too deep just where the original was
    return value


# The characters cut_json looks at: quotes and backslashes (to know what is inside a string)
# and brackets. One pass, each character once: no backtracking, whatever the text.
_JSON_MARK = re.compile(r'["\\\[\]{}]')
_CLOSER = {"[": "]", "{": "}"}


def cut_json(text: str, limit: int, what: str = "the value") -> str:
    """``text`` with the contents of every object and array at level ``limit + 1`` removed
    (``{"a":{"a":{...}}}`` becomes ``{"a":{"a":{}}}``), so ``json.loads`` can read the rest
    whatever the depth. A linear scan over quotes, escapes and brackets, without recursion; the
    removed contents are checked only for matching brackets (they are never used). Malformed if
    the brackets do not match or a string does not end."""
    out: list[str] = []
    copied = 0  # text[copied:] is not yet in out
    open_: list[str] = []
    in_string = False
    escaped = -1  # the position of a character escaped by a backslash
    for m in _JSON_MARK.finditer(text):
        at = m.start()
        char = text[at]
        if in_string:
            if at == escaped:
                continue
            if char == "\\":
                escaped = at + 1
            elif char == '"':
                in_string = False
            continue
        if char == '"':
            in_string = True
        elif char in _CLOSER:
            open_.append(char)
            if len(open_) == limit + 1:  # keep the bracket, drop what it holds
                out.append(text[copied:at + 1])
        elif char != "\\":  # a backslash outside a string: json.loads refuses it below
            if not open_ or _CLOSER[open_.pop()] != char:
                raise Malformed(f"{what} is not JSON: unbalanced {char!r} at offset {at}")
            if len(open_) == limit:
                copied = at
    if in_string:
        raise Malformed(f"{what} is not JSON: a string does not end")
    if open_:
        raise Malformed(f"{what} is not JSON: {len(open_)} unclosed brackets")
    out.append(text[copied:])
    return "".join(out)


# -- DAG-CBOR -----------------------------------------------------------------------------------

def _head(data: bytes, pos: int) -> tuple[int, int, int]:
    """(major type, argument, position after the head) of the CBOR item at ``pos``."""
    if pos >= len(data):
        raise Malformed("truncated")
    first = data[pos]
    major, info = first >> 5, first & 0x1F
    if info < 24:
        return major, info, pos + 1
    if info > 27:  # indefinite lengths and reserved values: not DAG-CBOR
        raise Malformed(f"byte {first:#04x} at offset {pos} is not DAG-CBOR")
    size = 1 << (info - 24)
    end = pos + 1 + size
    if end > len(data):
        raise Malformed("truncated")
    return major, int.from_bytes(data[pos + 1:end], "big"), end


def _skip(data: bytes, pos: int) -> int:
    """The position after the (possibly nested) item at ``pos``, without recursion."""
    pending = 1
    while pending:
        pending -= 1
        major, arg, pos = _head(data, pos)
        if major in (2, 3):
            pos += arg
        elif major == 4:
            pending += arg
        elif major == 5:
            pending += 2 * arg
        elif major == 6:
            pending += 1  # a tag applies to the item that follows
    if pos > len(data):
        raise Malformed("truncated")
    return pos


def cut_cbor(data: bytes, limit: int) -> bytes | None:
    """``data`` (one or more CBOR items in a row) with every map and array at level ``limit + 1``
    replaced by an empty one of the same kind; None if nothing nests that deep. Without recursion."""
    out = bytearray()
    copied = 0
    cut = False
    pos = 0
    while pos < len(data):  # one top-level item per turn
        remaining = [1]  # items still to read in each open container (the first: the item itself)
        while remaining:
            if remaining[-1] == 0:
                remaining.pop()
                continue
            remaining[-1] -= 1
            start = pos
            major, arg, pos = _head(data, pos)
            if major in (2, 3):
                pos += arg
                if pos > len(data):
                    raise Malformed("truncated")
            elif major == 6:
                remaining[-1] += 1
            elif major in (4, 5):
                if len(remaining) > limit:  # this container is at level len(remaining)
                    out += data[copied:start]
                    out.append(0x80 if major == 4 else 0xA0)
                    pos = copied = _skip(data, start)
                    cut = True
                else:
                    remaining.append(arg * (2 if major == 5 else 1))
    if not cut:
        return None
    out += data[copied:]
    return bytes(out)


def decode_dag_cbor(data: bytes, what: str, limit: int = MAX_DEPTH, *, multi: bool = False, cut: bool = False) -> Any:
    """DAG-CBOR bytes as a value (``multi``: the list of the items in a row, as a firehose frame
    holds them), refused (Malformed, naming ``what``) if they are not DAG-CBOR or nest deeper
    than ``limit``. ``cut``: as for ``loads``, a too-deep value comes back cut at ``limit + 1``
    levels instead (records in a frame: the one that is too deep is still answered)."""
    try:
        value = _decode_cbor(data, what, multi)
    except RecursionError:
        pass  # deeper than libipld can go: cut below, which also finds where
    else:
        if all(too_deep(item, limit) is None for item in (value if multi else [value])):
            return value
    try:
        data = cut_cbor(data, limit) or data
    except Malformed as e:
        raise Malformed(f"{what} is not DAG-CBOR: {e}") from None
    try:
        value = _decode_cbor(data, what, multi)
    except RecursionError:  # only if the caller's own stack is nearly used up: a cut value is shallow
        raise Malformed(f"{what} is nested too deep to decode here") from None
    if not cut:
        for item in value if multi else [value]:
            check_depth(item, what, limit)  # names where: the cut value is too deep just there
    return value


def _decode_cbor(data: bytes, what: str, multi: bool) -> Any:
    """libipld's decoding, its errors as Malformed; RecursionError passes (the caller cuts)."""
    try:
        return libipld.decode_dag_cbor_multi(data) if multi else libipld.decode_dag_cbor(data)
    except (ValueError, TypeError, OverflowError) as e:
        raise Malformed(f"{what} is not DAG-CBOR: {e}") from None
