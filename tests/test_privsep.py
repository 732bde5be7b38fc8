"""An unprivileged daemon (`[runner] user`, atrund/privsep.py): `atrund serve` started as root
starts its privileged helper, hands over its directories and drops for good; bundles still run,
fenced as before, with network through the helper's namespaces.

Everything is real: the local PDS and PLC, `atrund serve` as a subprocess, the process backend's
fork server as the helper, the Docker engine for `container`, QEMU and the built guest for
`microvm` (its monitors started by the helper). The daemon's uid is one no one
else uses (DAEMON_UID); its state and work directories live in a directory it can reach
(pytest's own tmp is root's alone).
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from conftest import ROOT, _built_image, atrund, wait_result

from atrund.errors import DropFailed, HelperGone
from atrund.privsep import user_ids

DAEMON_UID = 64_731  # no passwd entry needed: a numeric uid[:gid]
pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="dropping to another user needs root")

SOURCE = (
    "import os, socket\n"
    "def main(args):\n"
    "    out = {'uid': os.getuid()}\n"
    "    if args.get('port'):\n"
    "        with socket.create_connection(('127.0.0.1', args['port']), timeout=5) as s:\n"
    "            out['heard'] = s.recv(100).decode()\n"
    "    return out\n"
)
SPIN = "def main(args):\n    while True:\n        pass\n"
WORKER_UIDS = range(930_000, 930_256)  # executor.process.uid_base below


def _running_workers() -> list[int]:
    """Processes of a worker uid that are running (a spinning bundle), not waiting."""
    found = []
    for entry in filter(str.isdigit, os.listdir("/proc")):
        try:
            status = _status(int(entry))
        except OSError:
            continue
        if int(status["Uid"].split()[0]) in WORKER_UIDS and status["State"].startswith("R"):
            found.append(int(entry))
    return found


def as_the_unit_starts_it() -> list[str]:
    """setpriv with what packaging/atrund.service gives serve before it starts: its capability
    bounding set and no_new_privs. So the unit's capabilities are shown to be enough."""
    unit = (ROOT / "packaging" / "atrund.service").read_text().splitlines()
    caps = next(line.split("=", 1)[1].split() for line in unit if line.startswith("CapabilityBoundingSet="))
    assert "NoNewPrivileges=yes" in unit
    bounding = ",".join(["-all", *(f"+{cap.removeprefix('CAP_').lower()}" for cap in caps)])
    return [shutil.which("setpriv") or "setpriv", "--no-new-privs", f"--bounding-set={bounding}", "--"]


def _status(pid: int) -> dict[str, str]:
    with open(f"/proc/{pid}/status") as f:
        return {k: v.strip() for k, _, v in (line.partition(":") for line in f)}


@pytest.fixture
def home():
    """A directory the daemon's uid can reach (0711; its contents are handed over by serve), outside
    /tmp (which a process worker has its own of, so its files would be out of sight, not denied)."""
    path = Path(tempfile.mkdtemp(prefix="atrund-privsep-", dir="/var/tmp"))
    path.chmod(0o711)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def _config(home: Path, stack, runner, author, isolation: str, port: int, vm_guest: dict | None = None) -> Path:
    (home / "pw").write_text(runner.app_password)
    (home / "pw").chmod(0o600)  # root's: serve reads it before the drop
    image = f'[executor.container]\nimage = "{_built_image[0]}"\n' if isolation == "container" and _built_image else ""
    if vm_guest:  # the accelerator is auto, as an operator leaves it: probed as root, before the drop
        image += "[executor.microvm]\n" + "".join(f'{key} = "{path}"\n' for key, path in vm_guest.items())
    config = home / "config.toml"
    config.write_text(
        f'[runner]\npds = "{stack.pds_url}"\nidentifier = "{runner.handle}"\npassword_file = "pw"\n'
        f'user = "{DAEMON_UID}"\n'
        f'{stack.identity_toml()}[access]\nallowlist = ["{author.account.did}"]\n'
        f'[ingest]\npoll_interval = 0.2\n'
        f'[permissions]\nnet = ["127.0.0.1:{port}"]\nnet_private = ["127.0.0.1/32"]\n'
        f'[executor]\nisolation = "{isolation}"\nwarm = 1\nwork_dir = "{home / "work"}"\n'
        f'[executor.process]\nuid_base = 930000\n{image}'
        '[gateway]\nlisten = "127.0.0.1:0"\n'
        f'[state]\ndir = "{home / "state"}"\n'
    )
    return config


@pytest.fixture(params=["process", "container", "auto", "microvm"])
def isolation(request) -> str:
    if request.param == "container":
        request.getfixturevalue("container_engine")
    if request.param == "microvm":
        request.getfixturevalue("vm_guest")
    return request.param


def _monitors(helper: int) -> list[int]:
    """The QEMU processes below the helper (each under its monitor's init)."""
    found = []
    for init in _children(helper):
        for pid in _children(init):
            if Path(f"/proc/{pid}/comm").read_text().startswith("qemu-system"):
                found.append(pid)
    return found


def _children(pid: int) -> list[int]:
    try:
        return [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


@pytest.mark.vm
async def test_the_daemon_runs_unprivileged_and_its_workers_still_run_fenced_with_network(
        isolation, stack, new_account, author, reader, home, request):
    """`atrund serve` with `[runner] user` set answers invocations (a plain one, and one granted
    network to a loopback server, which goes through a namespace the helper made), started as
    packaging/atrund.service starts it (only its capabilities, and no_new_privs), while the serve
    process itself has the daemon's uid and gid in every slot, no capability at all (effective,
    permitted, bounding), no_new_privs, and only the groups its backend needs (the Docker
    socket's under container). Under auto, the backend probed as root before the drop. Under
    microvm, the helper starts QEMU, which runs as nobody, and the network grant is relayed over
    the VM's channel (about 60 s under TCG: two VM boots). Before: serve ran as root, and refused
    microvm under runner.user."""
    runner = new_account("unpriv")
    server = await asyncio.start_server(lambda r, w: (w.write(b"hello from the host"), w.close()), "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    config = _config(home, stack, runner, author, isolation, port,
                     request.getfixturevalue("vm_guest") if isolation == "microvm" else None)
    boots = 120 if isolation == "microvm" else 60  # a VM's cold boot under TCG takes 10-30 s
    plain = await author.publish(SOURCE)
    spinning = await author.publish(SPIN)
    networked = await author.publish(SOURCE, permissions={"net": [f"127.0.0.1:{port}"]})
    log = home / "serve.log"
    with open(log, "a") as out:
        proc = subprocess.Popen([*as_the_unit_starts_it(), sys.executable, "-m", "atrund.cli", "serve", "-c", str(config),
                                 "--json-logs"], stdout=out, stderr=subprocess.STDOUT, cwd=ROOT)

    async def answer(bundle, status="success", **fields):
        try:
            result = await wait_result(reader, runner.did, await author.invoke(bundle, runner.did, **fields), timeout=boots)
        except AssertionError as e:
            raise AssertionError(f"{e}\n{log.read_text()[-4000:]}") from None
        assert result["status"] == status, (result, log.read_text()[-3000:])
        return result

    try:
        first = await answer(plain)
        backend = first["metrics"]["isolation"]  # auto: what it chose, probed as root before the drop
        assert backend == isolation or (isolation == "auto" and backend in ("process", "container", "microvm")), backend
        second = await answer(networked, args={"port": port})
        assert second["data"]["heard"] == "hello from the host"
        assert first["data"]["uid"] not in (0, DAEMON_UID)  # the worker has a uid of its own, as before
        if backend == "process":  # killed past its deadline by the helper: the runner may not signal a worker's uid
            await answer(spinning, status="timeout", timeout=2)
            for _ in range(100):
                if not _running_workers():
                    break
                await asyncio.sleep(0.1)
            assert not _running_workers(), "a spinning worker outlived its deadline"
        if backend == "process":  # hostile bundles against a dropped runner: its files and itself are out of reach
            hostile = Path(__file__).parent / "hostile" / "python"
            database = home / "state" / "atrund.sqlite3"  # the runner's, now the daemon user's
            for path in (database, home / "pw", Path("/etc/shadow")):
                read = await answer(await author.publish((hostile / "read_file.py").read_text()), args={"path": str(path)})
                assert read["data"] == {"denied": "PermissionError"}, (path, read["data"])
            await answer(await author.publish((hostile / "signal_parent.py").read_text()), args={"sentinel": proc.pid})
            assert proc.poll() is None  # the runner (whose uid is not the worker's) survives kill(pid) and kill(-1)
        status = _status(proc.pid)
        uid, gid = user_ids(str(DAEMON_UID))
        assert status["Uid"].split() == [str(uid)] * 4 and status["Gid"].split() == [str(gid)] * 4, status
        assert status["CapEff"] == status["CapPrm"] == status["CapBnd"] == status["CapAmb"] == "0" * 16, status
        assert status["NoNewPrivs"] == "1"
        groups = {int(g) for g in status["Groups"].split()}
        expected = {gid} | ({os.stat("/var/run/docker.sock").st_gid} if backend == "container" else set())
        assert groups == expected, status["Groups"]
        helper = [int(p) for p in Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()]
        assert any(_status(p)["Uid"].split()[0] == "0" for p in helper)  # the privileged helper stays root
        if backend == "microvm":  # the warm VM's QEMU: the helper's, dropped to nobody, not the runner's uid
            for _ in range(100):
                monitors = [m for h in helper for m in _monitors(h)]
                if monitors and all(_status(m)["Uid"].split()[0] != "0" for m in monitors):
                    break
                await asyncio.sleep(0.2)
            assert monitors and all(_status(m)["Uid"].split() == ["65534"] * 4 for m in monitors), monitors
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
        server.close()
    assert proc.returncode == 0, log.read_text()[-3000:]
    assert "Traceback" not in log.read_text()


def test_an_unknown_user_is_one_clear_line(tmp_path):
    """`[runner] user` naming no user (or root): serve stops at once with one line naming it, not a
    traceback; check-config warns of it first."""
    config = tmp_path / "config.toml"
    (tmp_path / "pw").write_text("x")
    config.write_text('[runner]\npds = "http://localhost:1"\nidentifier = "a.test"\npassword_file = "pw"\n'
                      'user = "no-such-user-here"\n[executor]\nisolation = "process"\n'
                      f'[state]\ndir = "{tmp_path / "state"}"\n')
    result = atrund("serve", "-c", str(config), timeout=60)
    assert result.returncode == DropFailed.exit_code, result.stderr
    assert "runner.user: no such user 'no-such-user-here'" in result.stderr
    assert "Traceback" not in result.stderr
    checked = atrund("check-config", "-c", str(config))  # said before serve is ever started
    assert checked.returncode == 0 and "runner.user: no such user 'no-such-user-here'" in checked.stderr, checked.stderr
    config.write_text(config.read_text().replace('user = "no-such-user-here"', 'user = "0:0"'))
    root = atrund("serve", "-c", str(config), timeout=60)
    assert root.returncode == DropFailed.exit_code and "runner.user: '0:0' is root" in root.stderr, root.stderr


def test_firecracker_is_refused_under_a_user_before_anything_changes(tmp_path):
    """The helper starts QEMU only: `[runner] user` with Firecracker as the monitor stops serve at
    once with one line naming the key, before it hands anything over (the state directory is not
    even made)."""
    config = tmp_path / "config.toml"
    (tmp_path / "pw").write_text("x")
    config.write_text('[runner]\npds = "http://localhost:1"\nidentifier = "a.test"\npassword_file = "pw"\n'
                      f'user = "{DAEMON_UID}"\n[executor]\nisolation = "microvm"\n[executor.microvm]\nmonitor = "firecracker"\n'
                      f'[state]\ndir = "{tmp_path / "state"}"\n')
    result = atrund("serve", "-c", str(config), timeout=60)
    assert result.returncode != 0 and "executor.microvm.monitor: firecracker cannot run under runner.user yet" in result.stderr, \
        result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "state").exists()


async def test_when_the_helper_dies_serve_stops_so_that_it_is_started_again(stack, new_account, author, reader, home):
    """The privileged helper killed (SIGKILL) under a dropped `serve`: an unprivileged runner
    cannot start another, so rather than failing every invocation from then on, serve stops by
    itself within seconds, with HelperGone's exit code (which packaging/atrund.service's
    Restart=on-failure restarts), a log line naming why, and no traceback. Before: it kept
    serving, and every invocation failed with "restart the runner"."""
    runner = new_account("helpergone")
    config = _config(home, stack, runner, author, "process", 9)
    plain = await author.publish(SOURCE)
    log = home / "serve.log"
    with open(log, "a") as out:
        proc = subprocess.Popen([*as_the_unit_starts_it(), sys.executable, "-m", "atrund.cli", "serve", "-c", str(config)],
                                stdout=out, stderr=subprocess.STDOUT, cwd=ROOT)
    try:
        result = await wait_result(reader, runner.did, await author.invoke(plain, runner.did), timeout=60)
        assert result["status"] == "success", (result, log.read_text()[-3000:])
        children = [int(p) for p in Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()]
        helper = next(p for p in children if _status(p)["Uid"].split()[0] == "0")
        os.kill(helper, signal.SIGKILL)
        for _ in range(300):
            if proc.poll() is not None:
                break
            await asyncio.sleep(0.1)
        assert proc.poll() is not None, "serve kept running without its helper"
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
    text = log.read_text()
    assert proc.returncode == HelperGone.exit_code, text[-3000:]
    assert "the privileged helper is gone" in text and "Traceback" not in text, text[-3000:]


async def test_a_stop_signal_to_serve_and_its_helper_drains_running_work(stack, new_account, author, reader, home):
    """SIGTERM to serve and to its helper at once (what a service manager that signals every
    process of the unit does: KillMode=control-group; packaging/atrund.service now says mixed):
    the helper ignores it and the runner drains, so the invocation running at that moment
    finishes and is recorded as a success, and serve exits 0, not HelperGone. Before: the helper
    died of the signal, the running worker with it, and serve exited 59."""
    runner = new_account("groupstop")
    arrived = asyncio.Event()

    async def accept(reader_, writer):
        arrived.set()
        writer.close()

    server = await asyncio.start_server(accept, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    config = _config(home, stack, runner, author, "process", port)
    slow = await author.publish("import socket, time\ndef main(args):\n"
                                "    socket.create_connection(('127.0.0.1', args['port']), timeout=5).close()\n"
                                "    time.sleep(3)\n    return {'slept': True}\n", permissions={"net": [f"127.0.0.1:{port}"]})
    log = home / "serve.log"
    with open(log, "a") as out:
        proc = subprocess.Popen([*as_the_unit_starts_it(), sys.executable, "-m", "atrund.cli", "serve", "-c", str(config)],
                                stdout=out, stderr=subprocess.STDOUT, cwd=ROOT)
    try:
        uri = await author.invoke(slow, runner.did, args={"port": port})
        await asyncio.wait_for(arrived.wait(), 60)  # it runs
        children = [int(p) for p in Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()]
        helper = next(p for p in children if _status(p)["Uid"].split()[0] == "0")
        os.kill(helper, signal.SIGTERM)
        os.kill(proc.pid, signal.SIGTERM)
        for _ in range(300):
            if proc.poll() is not None:
                break
            await asyncio.sleep(0.1)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        server.close()
    text = log.read_text()
    assert proc.returncode == 0, text[-3000:]
    assert "privileged helper is gone" not in text and "Traceback" not in text, text[-3000:]
    result = await wait_result(reader, runner.did, uri, timeout=30)
    assert result["status"] == "success" and result["data"] == {"slept": True}, result
