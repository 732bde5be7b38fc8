"""What `atrund bundle publish` checks before it uploads a file: that it is for the runtime named
(its extension), that it parses (the runtime's own checker, from its runtime.json), and which
endpoints it defines (to check --endpoints, or to declare them when none are given).

Everything about a runtime comes from its runtime.json (``accepts``, ``check``, ``endpoints``):
no runtime is named here.
"""

from __future__ import annotations

import ast
import os
import re
import subprocess
from pathlib import Path

from atrund.errors import CheckFailed
from atrund.execute.runtimes import Runtime

CHECK_SECONDS = 30
# ES module exports that can be endpoints: functions, and names bound by const/let/var or listed.
_ES_FUNCTION = re.compile(r"^\s*export\s+(?:async\s+)?function\s*\*?\s*([A-Za-z_$][\w$]*)", re.M)
_ES_BINDING = re.compile(r"^\s*export\s+(?:const|let|var)\s+([A-Za-z_$][\w$]*)", re.M)
_ES_LIST = re.compile(r"^\s*export\s*\{([^}]*)\}", re.M)


def check_extension(path: Path, runtime: Runtime, runtimes: dict[str, Runtime]) -> None:
    """CheckFailed if ``path`` has another runtime's extension and not one ``runtime`` accepts."""
    suffix = path.suffix.lower()
    if not suffix or suffix in runtime.accepts:
        return
    others = [name for name, rt in runtimes.items() if suffix in rt.accepts]
    if others:
        raise CheckFailed(f"{path.name} is a {' or '.join(others)} file, not {runtime.name} "
                          f"(it takes {', '.join(runtime.accepts)}): did you mean --runtime {others[0]}?")


def check_syntax(path: Path, runtime: Runtime) -> None:
    """Run the runtime's own checker on ``path``; CheckFailed with its first lines if it refuses."""
    if not runtime.check:
        return
    argv = [w.replace("{file}", str(path)) for w in runtime.check]
    stdin = None if any("{file}" in w for w in runtime.check) else path.read_bytes()
    try:
        p = subprocess.run(argv, input=stdin, capture_output=True, timeout=CHECK_SECONDS,
                           env={**os.environ, "NO_COLOR": "1"})
    except FileNotFoundError:
        raise CheckFailed(f"cannot check {path.name}: {argv[0]} is not installed (publish with --no-check to skip)") from None
    except subprocess.TimeoutExpired:
        raise CheckFailed(f"checking {path.name} took more than {CHECK_SECONDS} s") from None
    if p.returncode != 0:
        raise CheckFailed(f"{path.name} does not parse as {runtime.name}: {_first_lines(p.stderr or p.stdout)}")


def _first_lines(output: bytes) -> str:
    """A checker's complaint as one line: the lines before any stack dump, squeezed."""
    text = output.decode(errors="replace")
    text = text.split("Stack backtrace")[0].split("\nTraceback")[0]
    lines = [line.strip() for line in text.splitlines() if line.strip() and not _NOISE.match(line.strip())]
    return " ".join(lines)[:400] or "the checker refused it"


# Source excerpts and markers under them, the checker's own frames, its version banner.
_NOISE = re.compile(r"^([\^~|]|\d+\s*\||at .*node:internal|Node\.js v)")


def endpoints_of(source: str, runtime: Runtime) -> list[str] | None:
    """The endpoints ``source`` defines, as ``runtime`` finds them; None when the runtime does
    not say how (or the source does not parse: the syntax check says why)."""
    if runtime.endpoints == "top-level functions":
        try:
            tree = ast.parse(source)
        except (SyntaxError, ValueError):
            return None
        names = [n.name for n in tree.body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]
        names += [t.id for n in tree.body if isinstance(n, ast.Assign) and isinstance(n.value, ast.Lambda)
                  for t in n.targets if isinstance(t, ast.Name)]
        return sorted({n for n in names if not n.startswith("_")})
    if runtime.endpoints == "exported functions":
        names = _ES_FUNCTION.findall(source) + _ES_BINDING.findall(source)
        for group in _ES_LIST.findall(source):
            names += [part.split(" as ")[-1].strip() for part in group.split(",") if part.strip()]
        return sorted({n for n in names if n and n != "default"})
    return None


def check_bundle(path: Path, runtime_name: str, runtimes: dict[str, Runtime], declared: list[str] | None) -> list[str] | None:
    """Every check, in order; returns the endpoints to declare: ``declared`` (each one checked to
    be defined), else the ones derived (None if the runtime does not say how to find them)."""
    runtime = runtimes[runtime_name]
    check_extension(path, runtime, runtimes)
    check_syntax(path, runtime)
    found = endpoints_of(path.read_text(errors="replace"), runtime)
    if found is None:
        return declared
    if declared is None:
        if not found:
            raise CheckFailed(f"{path.name} defines no endpoint ({runtime.endpoints}); name them with --endpoints "
                              "if they are made at run time")
        return found
    missing = [name for name in declared if name not in found]
    if missing:
        raise CheckFailed(f"{path.name} does not define {', '.join(missing)} (it defines {', '.join(found) or 'none'})")
    return declared
