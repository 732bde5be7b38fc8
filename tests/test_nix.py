"""nix/check.sh: every .nix file parses and every runtime flake evaluates against the stub nixpkgs.

Nix cannot fetch nixpkgs here, so nothing is built: the check runs the real flake machinery of
Debian's nix-bin (2.8) offline, with nixpkgs overridden by nix/stub-nixpkgs/. The check installs
nix-bin itself when run as root; without root and without nix-bin these tests are skipped.
Broken copies of the tree pin that the check can fail, and says where.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from atrund.config import REPO_ROOT

NIX_DIR = REPO_ROOT / "nix"
CHECK = NIX_DIR / "check.sh"
SYSTEMS = ["x86_64-linux", "aarch64-linux"]
OUTPUTS = ["packages.{}.at-run-exec", "packages.{}.image", "packages.{}.rootfs", "packages.{}.default", "checks.{}.selftest"]


def _nix_available() -> bool:
    if shutil.which("nix-instantiate"):
        return True
    return os.geteuid() == 0 and shutil.which("apt-get") is not None


pytestmark = pytest.mark.skipif(
    not _nix_available(),
    reason="nix-bin is not installed and cannot be installed (nix/check.sh installs it with apt-get only as root)",
)


def run_check(nix_dir: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["bash", str(CHECK), str(nix_dir)], capture_output=True, text=True, timeout=900,
    )


def runtimes() -> list[str]:
    return sorted(p.parent.name for p in NIX_DIR.glob("runtimes/*/runtime.json"))


@pytest.fixture(scope="module")
def check() -> subprocess.CompletedProcess:
    return run_check(NIX_DIR)


def test_check_passes(check):
    """The repository's nix/ passes: exit 0, no FAIL line, a summary with 0 failed."""
    assert check.returncode == 0, check.stdout + check.stderr
    assert "FAIL" not in check.stdout
    assert check.stdout.rstrip().endswith(" 0 failed"), check.stdout


def test_every_runtime_has_a_flake_and_every_output_evaluates(check):
    """Each runtime directory has a flake.nix whose four packages and self-test evaluate to a
    derivation for both systems, and whose real nixpkgs input is a NixOS/nixpkgs branch."""
    names = runtimes()
    assert set(names) >= {"python", "deno", "node"}
    lines = check.stdout.splitlines()
    for rt in names:
        assert (NIX_DIR / "runtimes" / rt / "flake.nix").is_file(), rt
        assert any(line.startswith(f"ok    input  {rt}  nixpkgs = github:NixOS/nixpkgs/") for line in lines), rt
        assert f"ok    flake  {rt}  nix flake check --no-build" in lines, rt
        for system in SYSTEMS:
            for out in OUTPUTS:
                attr = out.format(system)
                assert any(
                    line.startswith(f"ok    eval   {rt}  {attr}  ") and line.endswith(".drv") for line in lines
                ), f"{rt} {attr} not evaluated:\n{check.stdout}"


def test_every_nix_file_is_parsed(check):
    """(a) of the check: one parse line per .nix file under nix/."""
    files = sorted(str(p.relative_to(NIX_DIR)) for p in NIX_DIR.rglob("*.nix"))
    assert files
    for rel in files:
        assert f"ok    parse  {rel}" in check.stdout.splitlines(), rel


STORE = r"/nix/store/[0-9a-z]{32}-"
PROGRAMS = {  # placeholder -> (package name in the store path, executable)
    "python": ("python3", "python3"),
    "deno": ("deno", "deno"),
    "node": ("nodejs", "node"),
}


def test_at_run_exec_runs_runtime_json_command(check):
    """bin/at-run-exec execs runtime.json's command word for word, each placeholder replaced by
    a store path: {dir} the runtime directory in the store, {python} {deno} {node} the program
    of the Nix-built interpreter; extra arguments are passed on."""
    for rt in runtimes():
        spec = json.loads((NIX_DIR / "runtimes" / rt / "runtime.json").read_text())
        words = []
        for word in spec["command"]:
            pattern = re.escape(word)
            pattern = pattern.replace(re.escape("{dir}"), STORE + re.escape(f"atrun-runtime-{spec['name']}"))
            for placeholder, (package, exe) in PROGRAMS.items():
                pattern = pattern.replace(
                    re.escape("{" + placeholder + "}"), STORE + re.escape(package) + r"-[^/']+/bin/" + re.escape(exe)
                )
            words.append("'" + pattern + "'")
        line = next((l for l in check.stdout.splitlines() if l.startswith(f"ok    cmd    {rt}  ")), None)
        assert line, f"no cmd line for {rt}:\n{check.stdout}"
        assert re.fullmatch(r"exec " + " ".join(words) + r' "\$@"', line.split(f"cmd    {rt}  ", 1)[1]), line


def _broken_tree(tmp_path: Path) -> Path:
    tree = tmp_path / "nix"
    shutil.copytree(NIX_DIR, tree, ignore=shutil.ignore_patterns("__pycache__", "result"))
    return tree


def _add_runtime(tree: Path, flake: str) -> None:
    rdir = tree / "runtimes" / "broken"
    rdir.mkdir()
    shutil.copy(NIX_DIR / "runtimes/python/at-run-exec", rdir / "at-run-exec")
    (rdir / "runtime.json").write_text(json.dumps(
        {"name": "broken", "command": ["{python}", "-I", "-S", "{dir}/at-run-exec"], "extension": ".py"}
    ))
    (rdir / "flake.nix").write_text(flake)


GOOD_FLAKE = (NIX_DIR / "runtimes/python/flake.nix").read_text()


@pytest.mark.parametrize(
    "case, expected",
    [
        # A flake that does not parse.
        ("syntax", "FAIL  parse  runtimes/broken/flake.nix"),
        # A nixpkgs attribute that does not exist.
        ("attribute", "FAIL  eval   broken  packages.x86_64-linux.at-run-exec"),
        # runtime.json names a program the flake gives no package for.
        ("placeholder", "FAIL  eval   broken  packages.aarch64-linux.image"),
        # A shared-library change nixpkgs would reject: a misspelt buildLayeredImage argument.
        ("image-argument", "FAIL  eval   python  packages.x86_64-linux.image"),
    ],
)
def test_a_broken_flake_fails_the_check(tmp_path, case, expected):
    """The check can fail: a broken copy of the tree exits 1 and names what broke, while the
    parts that are not broken still pass."""
    tree = _broken_tree(tmp_path)
    if case == "syntax":
        _add_runtime(tree, GOOD_FLAKE.replace("outputs = {", "outputs = {{", 1))
    elif case == "attribute":
        _add_runtime(tree, GOOD_FLAKE.replace("pkgs.python3", "pkgs.python3_no_such_attribute"))
    elif case == "placeholder":
        _add_runtime(tree, GOOD_FLAKE)
        (tree / "runtimes/broken/runtime.json").write_text(json.dumps(
            {"name": "broken", "command": ["{python}", "{dir}/at-run-exec", "{ruby}"], "extension": ".py"}
        ))
    else:
        lib = tree / "lib/runtime.nix"
        text = lib.read_text()
        assert 'compressor = "none";' in text
        lib.write_text(text.replace('compressor = "none";', 'compresor = "none";'))
    result = run_check(tree)
    assert result.returncode == 1, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    assert expected in lines, result.stdout
    assert lines[-1].startswith("nix/check.sh: ") and not lines[-1].endswith(" 0 failed")
    if case != "image-argument":
        assert "ok    eval   deno  packages.x86_64-linux.image" in "\n".join(lines)
