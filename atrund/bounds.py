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
from typing import Any

from atrund.errors import AtrundError

MAX_DEPTH = 128


class Malformed(AtrundError):
    """Input that breaks a documented limit or is not the shape it claims; the message names
    where and which limit."""


def step(path: str, key: Any) -> str:
    """``path`` one level down: ``a.b`` for a key, ``a[3]`` for an index (how messages name a place)."""
    if isinstance(key, int):
        return f"{path}[{key}]"
    return f"{path}.{key}" if path else str(key)


def too_deep(value: Any, limit: int = MAX_DEPTH) -> str | None:
    """The path of the first container nested deeper than ``limit`` levels, else None.

    Iterative (an explicit stack), so any depth is measured without recursing."""
    stack: list[tuple[Any, int, str]] = [(value, 1, "")]
    while stack:
        node, depth, path = stack.pop()
        if isinstance(node, dict):
            items = node.items()
        elif isinstance(node, (list, tuple)):
            items = enumerate(node)
        else:
            continue
        if depth > limit:
            return path or "(top level)"
        for key, child in items:
            if isinstance(child, (dict, list, tuple)):
                stack.append((child, depth + 1, step(path, key)))
    return None


def check_depth(value: Any, what: str, limit: int = MAX_DEPTH) -> Any:
    """``value``, unless it nests deeper than ``limit``: then Malformed naming ``what`` and where."""
    where = too_deep(value, limit)
    if where is not None:
        if len(where) > 60:  # the path of a very deep value is long: its start says where it is
            where = where[:60] + "…"
        at = "" if where == "(top level)" else f" at {where}"
        raise Malformed(f"{what} is nested deeper than {limit} levels{at} (the limit)")
    return value


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def loads(data: bytes | str, what: str, limit: int = MAX_DEPTH) -> Any:
    """JSON text as a value, refused (Malformed, naming ``what``) if it is not strict JSON
    (``NaN`` and ``Infinity`` are not) or nests deeper than ``limit``."""
    try:
        value = json.loads(data, parse_constant=_no_constant)
    except RecursionError:
        raise Malformed(f"{what} is nested deeper than {limit} levels (the limit)") from None
    except ValueError as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise Malformed(f"{what} is not JSON: {e}") from None
    return check_depth(value, what, limit)
