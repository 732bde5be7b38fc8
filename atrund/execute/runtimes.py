"""Runtimes are directories (nix/runtimes/<name>/), not engine code.

Each holds ``at-run-exec``, a ``runtime.json`` saying how to start it, and a test bundle.
Adding a runtime touches no Python here.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path

from atrund.execute.base import ExecutorError


@dataclass(frozen=True)
class Runtime:
    name: str
    dir: Path
    command: tuple[str, ...]
    extension: str


def _expand(word: str, rdir: Path) -> str:
    return word.replace("{python}", sys.executable).replace("{dir}", str(rdir))


def load_runtimes(runtimes_dir: Path) -> dict[str, Runtime]:
    found: dict[str, Runtime] = {}
    for meta in sorted(runtimes_dir.glob("*/runtime.json")):
        rdir = meta.parent
        try:
            spec = json.loads(meta.read_text())
            found[spec["name"]] = Runtime(
                name=spec["name"],
                dir=rdir,
                command=tuple(_expand(w, rdir) for w in spec["command"]),
                extension=spec.get("extension", ""),
            )
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise ExecutorError(f"{meta}: not a valid runtime description: {e}") from e
    return found
