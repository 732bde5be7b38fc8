"""Fixtures: a real PDS + PLC on loopback (session-wide), accounts, and in-process runners.

Nothing here is mocked: the PDS is the reference implementation, the runner is our daemon,
bundles run in real subprocesses.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import subprocess
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from atrund import client, config
from atrund.app import App
from atrund.atproto.repos import Repos
from atrund.atproto.session import Session
from atrund.dev.stack import Account, LocalStack
from atrund.errors import NotFound
from atrund.execute import BACKENDS
from atrund.records import INVOCATION, RESULT, result_rkey

ROOT = Path(__file__).resolve().parent.parent


def atrund(*args: str, env: dict | None = None, cwd: Path | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    """The atrund command line as a user runs it: a real subprocess, from the repository root."""
    return subprocess.run([sys.executable, "-m", "atrund.cli", *args], capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, cwd=cwd or ROOT, timeout=timeout)


def serve_config(tmp_path: Path, stack, runner, author, runner_extra: str = "", executor_extra: str = "",
                 state: dict[str, str] | None = None, allow: list[str] | None = None, limits: str = "") -> Path:
    """A config for `atrund serve` as ``runner``, serving ``author`` (or the DIDs ``allow``
    lists), polling fast, under isolation none (the bundles these tests run mark host files),
    the gateway on a free loopback port; ``limits``: the ``[limits]`` section's lines."""
    (tmp_path / "pw").write_text(runner.app_password)
    config = tmp_path / "config.toml"
    allowed = ", ".join(f'"{did}"' for did in (allow or [author.account.did]))
    config.write_text(
        f'[runner]\npds = "{stack.pds_url}"\nidentifier = "{runner.handle}"\npassword_file = "pw"\n{runner_extra}'
        f'{stack.identity_toml()}[access]\nallowlist = [{allowed}]\n[limits]\n{limits}'
        f'[ingest]\npoll_interval = 0.2\n[executor]\nisolation = "none"\n{executor_extra}'
        '[gateway]\nlisten = "127.0.0.1:0"\n'
        + (f'[state]\ndir = "{tmp_path / "state"}"\n' + "".join(f'{k} = "{v}"\n' for k, v in state.items()) if state else "")
    )
    return config


def serve_subprocess(config: Path, log: Path, wrap=None) -> subprocess.Popen:
    """`atrund serve` as a real subprocess, its JSON logs appended to ``log``; ``wrap``: what
    makes the command line (one that execs it, keeping its pid: `ip netns exec`)."""
    argv = [sys.executable, "-m", "atrund.cli", "serve", "-c", str(config), "--json-logs"]
    with open(log, "a") as out:
        return subprocess.Popen(wrap(argv) if wrap else argv, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT)


def _author_env(stack, account) -> dict:
    """The environment `atrund bundle publish` and `invoke` read an author's login from."""
    return {"ATRUND_PDS": stack.pds_url, "ATRUND_IDENTIFIER": account.handle, "ATRUND_PASSWORD": account.app_password,
            "ATRUND_PLC_URL": stack.plc_url}

# Shared fixtures that live beside the code they drive: `rig` (a scripted firehose relay, tests/relay.py).
pytest_plugins = ["relay"]

_names = itertools.count()


# -- executor helpers shared by the executor, runtime and hostile suites ---------------------

async def execute_once(runtime: str, code_path: str, *, endpoint: str = "main", args: Any = None, timeout: int = 10,
                       permissions: dict | None = None, env: dict | None = None, warm: int = 0, **settings: Any):
    """One request through a fresh executor (real workers), shut down afterwards."""
    from atrund.execute import ExecRequest, create_executor
    from atrund.execute.protocol import ExecPermissions

    section = executor_settings(warm=warm, **settings)
    executor = create_executor(section, helper=privileged_helper(section) if settings.get("isolation") == HELPED else None)
    if warm:
        await executor.warm(warm)
    try:
        request = ExecRequest(code_path=code_path, endpoint=endpoint, args=args or {}, timeout=timeout,
                              permissions=ExecPermissions(**(permissions or {})), env=env or {})
        return await executor.execute(request, runtime)
    finally:
        await executor.shutdown()


HELPED = "process+helper"  # the process backend as an unprivileged runner has it: through its privileged helper


def privileged_helper(settings):
    """The helper of an unprivileged runner (privsep.py), for a test process that stays root: the
    workers are made exactly as for a runner that dropped (the policy's spec, the helper's mounts
    and namespaces), which the hostile suite then attacks. Every granted path is allowed: the
    helper's own refusals are tests/execute/test_helper.py's."""
    from atrund.execute.process.backend import privileged_helper

    return privileged_helper(settings, True, ["*"], ["*"], os.geteuid(), os.getegid())


def executor_settings(isolation: str = "none", **settings: Any):
    """ExecutorSection for a test isolation name: a backend, ``container+runsc`` (the container
    backend under gVisor), or ``process+helper`` (HELPED)."""
    from atrund.config import ExecutorSection

    backend, _, runtime = isolation.partition("+")
    if mode := os.environ.get("ATRUND_TEST_SECCOMP"):  # scripts/seccomp-trace watches under the denylist alone
        settings["process"] = {**settings.get("process", {}), "seccomp": mode}
    if backend == "container":
        # The image built from this checkout, by its content tag: another checkout's build moving
        # :latest on a shared engine does not change what these tests run.
        container = {**({"image": _built_image[0]} if _built_image else {}), **settings.get("container", {})}
        settings["container"] = {**container, **({"runtime": runtime} if runtime else {})}
    return ExecutorSection(isolation=backend, **settings)


_built_image: list[str] = []  # set by the container_engine fixture


# Every backend of the registry, weakest first, and the container backend under gVisor too.
ISOLATIONS = [variant for name in reversed(BACKENDS) for variant in ([name, f"{name}+runsc"] if name == "container" else [name])]
# Each microvm test boots a VM, about 10-20 s under software emulation (TCG) on these
# machines: only tests marked ``vm`` (a subset that means something inside a VM) run on it;
# pytest_collection_modifyitems below deselects the others. The README lists what is left out.
VM_ISOLATION = "microvm"


def require_isolation(request) -> str:
    """The isolation a parametrized test asked for; container variants need the engine and the
    image (built once per session, cached), and are skipped, saying why, where there is none."""
    isolation = request.param
    if isolation == VM_ISOLATION:
        request.getfixturevalue("vm_guest")
    if isolation.startswith("container"):
        info = request.getfixturevalue("container_engine")
        runtime = isolation.partition("+")[2]
        if runtime and runtime not in info["Runtimes"]:
            pytest.skip(f"the Docker engine has no {runtime} runtime (bash scripts/dockerd registers it)")
    return isolation


@pytest.fixture(scope="session")
def container_engine() -> dict[str, Any]:
    """A Docker engine that answers, with the runtime image built from this checkout."""
    import docker

    from atrund.execute.container import image

    try:
        client = docker.from_env(timeout=10)
        info = client.info()
    except docker.errors.DockerException as e:
        pytest.skip(f"no Docker engine answers ({e}); start one with: bash scripts/dockerd")
    _built_image[:] = [image.build(client, config.RUNTIMES_DIR, progress=lambda line: None)]
    client.close()
    return info


def pytest_collection_modifyitems(config, items):
    """Deselect microvm variants of tests not marked ``vm`` (see VM_ISOLATION)."""
    keep, drop = [], []
    for item in items:
        params = getattr(getattr(item, "callspec", None), "params", {})
        (drop if params.get("isolation") == VM_ISOLATION and not item.get_closest_marker("vm") else keep).append(item)
    if drop:
        config.hook.pytest_deselected(items=drop)
        items[:] = keep


@pytest.fixture(scope="session")
def vm_guest() -> dict[str, str]:
    """The microVM guest (kernel, initramfs, rootfs.ext4) built from this checkout, and QEMU."""
    import shutil

    from atrund.execute.container.image import ImageError
    from atrund.execute.microvm import guest as vmimage

    if not shutil.which("qemu-system-x86_64"):
        pytest.skip("qemu-system-x86_64 is not installed (Debian: apt-get install qemu-system-x86)")
    if os.geteuid() != 0:
        pytest.skip("building the VM guest's rootfs needs root")
    try:
        return vmimage.build(config.RUNTIMES_DIR, progress=lambda line: None)
    except ImageError as e:
        pytest.skip(f"the VM guest cannot be built here: {e}")


def gone(pid: int) -> bool:
    """True once ``pid`` has exited (a zombie counts: it runs nothing)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] == "Z"
    except FileNotFoundError:
        return True


@pytest.fixture(scope="session")
def stack(tmp_path_factory) -> LocalStack:
    with LocalStack(data_dir=tmp_path_factory.mktemp("stack")) as s:
        yield s


@pytest.fixture(scope="session")
def postgres():
    """A real Postgres for the session (atrund.dev.postgres: initdb + pg_ctl in a temporary directory)."""
    from atrund.dev.postgres import LocalPostgres, server_bin

    if server_bin() is None:
        pytest.skip("Postgres is not installed (scripts/setup installs Debian's postgresql)")
    with LocalPostgres() as pg:
        yield pg


@pytest.fixture
def pg_url(postgres) -> str:
    """The URL of a new, empty database: tests never see each other's state."""
    return postgres.create(f"t{os.getpid()}x{next(_names)}")


@pytest.fixture(params=["sqlite", "postgres"])
def state_section(request) -> dict[str, str]:
    """The ``[state]`` settings (beside ``dir``) of each backend: a test taking this runs on both."""
    return {} if request.param == "sqlite" else {"url": request.getfixturevalue("pg_url")}


HANDLE_LABEL = 18  # characters the reference PDS allows in a handle's first label


@pytest.fixture
def new_account(stack):
    """Make a fresh account: tests never see each other's invocations or runners."""

    def make(prefix: str) -> Account:
        suffix = f"{os.getpid() % 1000}x{next(_names)}"
        return stack.create_account(prefix[:HANDLE_LABEL - len(suffix)] + suffix)  # the PDS refuses longer

    return make


@dataclass
class Author:
    """An author using atrund.client in-process (the CLI on top of it is tested on its own)."""

    account: Account
    session: Session
    repos: Repos

    async def publish(self, source: str, runtime: str = "python", **fields: Any) -> dict[str, str]:
        return (await client.publish(self.session, self.repos, source.encode(), runtime, **fields)).ref

    async def invoke(self, bundle: dict[str, str], runner_did: str, endpoint: str = "main", args: Any = None,
                     **fields: Any) -> str:
        uri, _ = await client.invoke(self.session, self.repos, bundle["uri"], runner_did, endpoint, args, cid=bundle["cid"],
                                     **fields)
        return uri

    async def raw_invocation(self, record: dict[str, Any]) -> str:
        """An invocation record written as given: a malformed one, on purpose."""
        uri, _ = await self.session.create_record(INVOCATION, record)
        return uri


@pytest.fixture
async def login_author(new_account, reader) -> AsyncIterator:
    """Make a fresh account and log it in; sessions are closed at teardown."""
    made: list[Author] = []

    async def make(prefix: str = "author") -> Author:
        acct = new_account(prefix)
        made.append(Author(acct, await client.login(reader, acct.handle, acct.app_password, acct.pds_url), reader))
        return made[-1]

    yield make
    for a in made:
        await a.session.close()


@pytest.fixture
async def author(login_author) -> Author:
    return await login_author()


@pytest.fixture
async def reader(stack) -> AsyncIterator[Repos]:
    async with client.reader(stack.plc_url) as repos:
        yield repos


class RunnerHandle:
    """An App (the runner) serving in this event loop, with its own account and state directory."""

    def __init__(self, stack: LocalStack, account: Account, state_dir: Path, **sections: dict[str, Any]) -> None:
        pw = state_dir / "app-password"
        state_dir.mkdir(parents=True, exist_ok=True)
        pw.write_text(account.app_password)
        data = {
            "runner": {"pds": stack.pds_url, "identifier": account.handle, "password_file": str(pw)},
            "identity": stack.identity,
            "ingest": {"poll_interval": 0.2},
            "executor": {"warm": 1},
            "gateway": {"listen": "127.0.0.1:0"},  # any free port: runners in one test run side by side
            "state": {"dir": str(state_dir / "state")},
        }
        for name, values in sections.items():
            data.setdefault(name, {}).update(values)
        self.cfg = config.parse(data)
        self.account = account
        self.did = account.did
        self.app: App | None = None
        self._stop: asyncio.Event | None = None
        self._task: asyncio.Task | None = None

    async def start(self) -> "RunnerHandle":
        self.app = App(self.cfg)
        await self.app.start()
        self._stop = asyncio.Event()
        self._task = asyncio.create_task(self.app.run(self._stop))
        return self

    async def stop(self) -> None:
        if self._task is not None:
            self._stop.set()
            await self._task
            await self.app.close()
            self._task = None


@pytest.fixture
async def make_runner(stack, new_account, tmp_path) -> AsyncIterator:
    started: list[RunnerHandle] = []

    async def make(account: Account | None = None, state_name: str = "runner", start: bool = True, **sections) -> RunnerHandle:
        handle = RunnerHandle(stack, account or new_account("runner"), tmp_path / state_name, **sections)
        started.append(handle)
        return await handle.start() if start else handle

    yield make
    for h in started:
        await h.stop()


async def wait_result(reader: Repos, runner_did: str, invocation_uri: str, timeout: float = 30) -> dict[str, Any]:
    """Poll the computed result URI until the record exists (as any AT client would)."""
    found = await client.wait_result(reader, runner_did, invocation_uri, timeout, max_delay=0.1)
    if found is None:
        raise AssertionError(f"no result for {invocation_uri} after {timeout} s")
    return found["record"]


async def no_result(reader: Repos, runner_did: str, invocation_uri: str, settle: float = 2.0) -> bool:
    await asyncio.sleep(settle)
    try:
        await reader.get_record(runner_did, RESULT, result_rkey(invocation_uri))
        return False
    except NotFound:
        return True
