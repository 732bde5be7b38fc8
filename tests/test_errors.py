"""One error tree: every failure atrund expects is an AtrundError from atrund.errors with an exit
code of its own, and the CLI ends with one line naming the fix, never a traceback. The CLI cases
bring about each condition for real (no engine, no work dir, a closed port, the real PDS)."""

import importlib
import inspect
import os
import pkgutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

import atrund
from atrund import errors
from atrund.errors import (
    ConfigError,
    ExecutorError,
    IdentityError,
    InvalidUrl,
    LoginFailed,
    UnknownRuntime,
    Unreachable,
)

ROOT = Path(__file__).resolve().parent.parent
RESERVED = {0, 1, 2, 3, 4}  # done, a bug, usage, status not success, no result in time (README)
# Exceptions that never leave their module: the gateway's HTTP answer, the SDK answer the
# session translates into a RemoteError where it is raised, and the fork server's unwinding
# into a worker's at-run-exec (a separate stdlib-only program, not the runner's code), a refused
# state call, which atrund.kv answers inside the bundle, logs that are not the caller's, which
# the gateway answers with 403, and the OSError the address guard raises inside aiohttp's
# connector, translated to PrivateAddress. The privileged helper's refusal (forkserver.Refused) and
# anyip's NamespaceError live in stdlib-only files the helper loads; they reach the runner as an
# ExecutorError (forked.py, netns.create).
INTERNAL = {"atrund.gateway.HttpError", "atrund.atproto.session._BadAnswer", "atrund.execute.process.forkserver.Become",
            "atrund.kv._Refused", "atrund.logbook.NotYours", "atrund.atproto.addresses.RefusedAddress",
            "atrund.execute.process.forkserver.Refused", "atrund.execute.egress.anyip.NamespaceError"}


def _all_modules():
    for info in pkgutil.walk_packages(atrund.__path__, "atrund."):
        if info.name.endswith("__main__") or ".dev.demo" in info.name:
            continue
        yield importlib.import_module(info.name)


def test_every_exception_class_is_in_the_one_tree_with_an_exit_code_of_its_own():
    """Every exception class in the package is defined in atrund.errors, is an AtrundError, and
    has an exit code no other class and no reserved code has."""
    for module in _all_modules():
        for name, cls in inspect.getmembers(module, inspect.isclass):
            if issubclass(cls, BaseException) and cls.__module__.startswith("atrund") and \
                    f"{cls.__module__}.{name}" not in INTERNAL:
                assert cls.__module__ == "atrund.errors", f"{module.__name__}.{name} is defined outside atrund.errors"
                assert issubclass(cls, errors.AtrundError), f"{name} is not an AtrundError"
    codes = {cls.__name__: cls.exit_code for cls in errors.tree()}
    assert len(set(codes.values())) == len(codes), codes
    assert not RESERVED & set(codes.values())
    assert all(0 < code < 126 for code in codes.values())  # 126 and up mean "cannot execute" and signals to shells


def test_the_docstring_table_lists_every_class_with_its_code():
    for cls in errors.tree():
        line = next((x for x in errors.__doc__.splitlines() if f" {cls.__name__} " in x), None)
        assert line is not None and f" {cls.exit_code} " in line, cls.__name__


def atrund_cli(*args: str, env: dict | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "atrund.cli", *args], capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, cwd=ROOT, timeout=timeout)


def assert_one_line(p: subprocess.CompletedProcess, error: type, *needles: str) -> str:
    """The CLI failed with ``error``'s exit code and said so in one line naming the fix."""
    assert "Traceback" not in p.stderr, p.stderr
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), p.stderr
    assert p.returncode == error.exit_code, (p.returncode, p.stderr)
    for needle in needles:
        assert needle in lines[0], lines[0]
    if error.fix:
        assert lines[0].endswith(f"({error.fix})"), lines[0]
    return lines[0]


def closed_port() -> int:
    """A loopback port nothing listens on (bound, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _config(tmp_path: Path, extra: str = "") -> Path:
    cfg = tmp_path / "runner.toml"
    cfg.write_text(f'[runner]\npds = "http://127.0.0.1:{closed_port()}"\nidentifier = "r.test"\npassword_env = "NO_SUCH_PW"\n'
                   f'[state]\ndir = "{tmp_path}/state"\n{extra}')
    return cfg


def test_no_docker_engine(tmp_path):
    p = atrund_cli("exec", "examples/hello.py", "--runtime", "python", "--endpoint", "greet", "--isolation", "container",
                   env={"DOCKER_HOST": f"unix://{tmp_path}/no.sock"})
    assert_one_line(p, ExecutorError, f"unix://{tmp_path}/no.sock")


def test_no_usable_work_dir(tmp_path):
    (tmp_path / "a-file").write_text("")
    cfg = _config(tmp_path, f'[executor]\nwork_dir = "{tmp_path}/a-file/work"\n')
    p = atrund_cli("exec", "examples/hello.py", "--runtime", "python", "--endpoint", "greet", "--isolation", "process",
                   "-c", str(cfg))
    assert_one_line(p, ExecutorError, f"{tmp_path}/a-file/work", "executor.work_dir", "Not a directory")


@pytest.mark.parametrize("command", [["check-config"], ["serve"], ["access", "list"]])
def test_bad_config_key(tmp_path, command):
    cfg = _config(tmp_path, "[executor]\nwarmth = 1\n")
    p = atrund_cli(*command, "-c", str(cfg))
    assert_one_line(p, ConfigError, f"{cfg}: invalid configuration: executor.warmth: unknown key")


def test_unknown_runtime():
    p = atrund_cli("exec", "examples/hello.py", "--runtime", "cobol", "--endpoint", "greet", "--isolation", "none")
    assert_one_line(p, UnknownRuntime, "runtime 'cobol' is not offered here (offered: ", "python")


def _publish(pds: str, identifier: str = "nobody.test", password: str = "x", plc: str | None = None):
    env = {"ATRUND_PDS": pds, "ATRUND_IDENTIFIER": identifier, "ATRUND_PASSWORD": password}
    if plc:
        env["ATRUND_PLC_URL"] = plc
    return atrund_cli("bundle", "publish", "examples/hello.py", "--runtime", "python", env=env)


def test_pds_unreachable():
    port = closed_port()
    assert_one_line(_publish(f"http://127.0.0.1:{port}"), Unreachable, f"login to http://127.0.0.1:{port}")


def test_pds_url_without_a_scheme():
    assert_one_line(_publish("127.0.0.1:2583"), InvalidUrl, "'127.0.0.1:2583'", "https://127.0.0.1:2583")


def test_wrong_password(stack, new_account):
    alice = new_account("err")
    p = _publish(stack.pds_url, alice.handle, "wrong-wrong-wrong", stack.plc_url)
    assert_one_line(p, LoginFailed, f"login to {stack.pds_url} as {alice.handle}")


def test_serve_when_auto_finds_no_backend(tmp_path):
    """With no runtime directory, no backend can run the probe bundle: auto finds nothing, and
    serve says so before it connects anywhere (its info log lines are turned off here)."""
    (tmp_path / "no-runtimes").mkdir()
    cfg = _config(tmp_path, f'[executor]\nisolation = "auto"\nruntimes_dir = "{tmp_path}/no-runtimes"\n')
    p = atrund_cli("serve", "-c", str(cfg), "--log-level", "error", env={"DOCKER_HOST": f"unix://{tmp_path}/no.sock"})
    assert_one_line(p, ExecutorError, "no executor backend works on this host: ", "no python runtime directory")


def test_a_record_that_would_not_be_valid_is_not_written(stack, new_account):
    """What the author typed is checked before anything is written: a --runner that is neither a
    DID nor a handle is named, in one line (a handle is resolved to its DID first)."""
    alice = new_account("err")
    env = {"ATRUND_PDS": stack.pds_url, "ATRUND_IDENTIFIER": alice.handle, "ATRUND_PASSWORD": alice.app_password,
           "ATRUND_PLC_URL": stack.plc_url}
    p = atrund_cli("invoke", f"at://{alice.did}/dev.atrun.bundle/3l00000000000", "--runner", "nobody", "--endpoint", "main",
                   "--cid", "bafkreie5737gdxlw5i64vzichcalba3z2v5n6icifvx5xytvske7mr3hpm", env=env)
    assert_one_line(p, IdentityError, "'nobody' is not a handle or a DID")
