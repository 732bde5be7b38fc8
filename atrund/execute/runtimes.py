"""Runtimes are directories (nix/runtimes/<name>/), not engine code.

Each holds ``at-run-exec``, a ``runtime.json`` saying how to start it (and, for a runtime with a
program of its own, where to find that program: ``Program``), and a test bundle. Adding a
runtime touches no Python.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import sysconfig
from dataclasses import dataclass
from pathlib import Path

from atrund.execute.base import ExecutorError

REPO_ROOT = Path(__file__).resolve().parent.parent.parent


@dataclass(frozen=True)
class Program:
    """A runtime's own program (``deno``, ``node``), from the ``program`` object of its runtime.json:
    where the host has it (``search``, tried in order) and where the runtime image has it
    (``inImage``). Its ``name`` is its placeholder in the command: ``{deno}``.

    A search entry is ``$VARIABLE`` (a file named by the environment, when set), ``PATH`` (the
    program's name looked up on PATH), or a file path in which ``{repo}`` is this checkout and
    ``{scripts}`` / ``{userScripts}`` where pip puts the programs a package ships (the ``deno``
    package on PyPI ships deno there); a path is taken when the file exists. Found nowhere, the
    bare name is used (and starting the worker then says it is not a program)."""

    name: str
    search: tuple[str, ...]
    in_image: str

    @property
    def placeholder(self) -> str:
        return "{" + self.name + "}"

    def find(self) -> str:
        for where in self.search:
            if where.startswith("$"):
                if os.environ.get(where[1:]):
                    return os.environ[where[1:]]
            elif where == "PATH":
                if found := shutil.which(self.name):
                    return found
            else:
                path = expand((where,), SEARCH_PLACES)[0]
                if os.path.isfile(path):
                    return path
        return self.name


@dataclass(frozen=True)
class Runtime:
    name: str
    dir: Path
    command: tuple[str, ...]
    extension: str
    data_overhead_mb: int = 0
    template: tuple[str, ...] = ()  # the command as runtime.json writes it, placeholders unexpanded
    program: Program | None = None  # the runtime's own program, if it has one besides Python
    accepts: tuple[str, ...] = ()  # file extensions `bundle publish` takes for it (default: extension)
    check: tuple[str, ...] = ()  # its syntax check ({file}, or the file on stdin), expanded
    endpoints: str | None = None  # how a file's endpoints are found: "top-level functions" or "exported functions"
    syscalls: tuple[str, ...] | None = None  # the process backend's seccomp allowlist (the ``syscalls`` file), if any


def expand(template: tuple[str, ...], values: dict[str, str]) -> tuple[str, ...]:
    """A runtime.json command with its placeholders replaced by ``values`` (e.g. paths inside an image)."""
    out = []
    for word in template:
        for key, value in values.items():
            word = word.replace(key, value)
        out.append(word)
    return tuple(out)


SEARCH_PLACES = {
    "{repo}": str(REPO_ROOT),
    "{scripts}": sysconfig.get_path("scripts"),
    "{userScripts}": sysconfig.get_path("scripts", sysconfig.get_preferred_scheme("user")),
}


def python() -> str:
    """``{python}``, the interpreter of every at-run-exec (and the python runtime's program): the
    system's python3, readable by the process backend's unprivileged workers, else ours."""
    return "/usr/bin/python3" if os.access("/usr/bin/python3", os.X_OK) else sys.executable


def _expand(word: str, rdir: Path, program: Program | None) -> str:
    if "{python}" in word:
        word = word.replace("{python}", python())
    if program is not None and program.placeholder in word:
        word = word.replace(program.placeholder, program.find())
    return word.replace("{dir}", str(rdir))


def _program(spec: dict) -> Program | None:
    if "program" not in spec:
        return None
    p = spec["program"]
    return Program(name=p["name"], search=tuple(p["search"]), in_image=p["inImage"])


def _syscalls(own: Path) -> tuple[str, ...] | None:
    """The system calls the process backend allows a runtime's workers: its ``syscalls`` file
    (what it was traced calling) and the shared ``syscalls.base`` beside the runtime directories
    (one name a line, ``#`` comments). None without its own file: the backend then applies its
    denylist alone (atrund doctor says so)."""
    if not own.exists():
        return None
    base = own.parent.parent / "syscalls.base"
    names = [line.split("#", 1)[0].strip() for path in (base, own) if path.exists() for line in path.read_text().splitlines()]
    return tuple(sorted({name for name in names if name}))


def declared(runtimes_dir: Path) -> dict[str, str]:
    """Each runtime the directories declare, by name, with its bundle file extension, without
    resolving programs: the CLI's choices and the demo's (adding a runtime directory adds a
    choice; no runtime is named in Python)."""
    found = {}
    for meta in sorted(runtimes_dir.glob("*/runtime.json")):
        try:
            spec = json.loads(meta.read_text())
            found[spec["name"]] = spec["extension"]
        except (OSError, ValueError, KeyError, TypeError):
            continue  # load_runtimes says what is wrong with it, where it matters
    return dict(sorted(found.items()))


def load_runtimes(runtimes_dir: Path) -> dict[str, Runtime]:
    found: dict[str, Runtime] = {}
    for meta in sorted(runtimes_dir.glob("*/runtime.json")):
        rdir = meta.parent
        try:
            spec = json.loads(meta.read_text())
            if spec["name"] in found:
                raise ExecutorError(f"{meta}: runtime {spec['name']!r} is already defined by {found[spec['name']].dir}")
            program = _program(spec)
            found[spec["name"]] = Runtime(
                name=spec["name"],
                dir=rdir,
                command=tuple(_expand(w, rdir, program) for w in spec["command"]),
                extension=spec.get("extension", ""),
                data_overhead_mb=int(spec.get("dataOverheadMb", 0)),
                template=tuple(spec["command"]),
                program=program,
                accepts=tuple(spec.get("accepts") or ([spec["extension"]] if spec.get("extension") else [])),
                check=tuple(_expand(w, rdir, program) for w in spec.get("check", ())),
                endpoints=spec.get("endpoints"),
                syscalls=_syscalls(rdir / "syscalls"),
            )
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise ExecutorError(f"{meta}: not a valid runtime description: {e}") from e
    return found
