"""Hostile bundles (tests/hostile/<runtime>/, one attack each, explained in its docstring),
run against every backend this host offers.

For ``process`` every attack must be contained, and so for ``process+helper``: the process
backend as a runner running as its own user has it (``[runner] user``), every root step done by
its privileged helper (conftest.HELPED). For ``none`` (no sandbox) the tests assert
what really happens, so the README's list of what ``none`` does not contain stays true; the
two attacks that would harm the machine running the tests under ``none`` (a fork bomb as root,
kill(-1) as root) are skipped there, and say so.
"""

import asyncio
import os
import subprocess
import time
from pathlib import Path

import pytest
from conftest import HELPED, ISOLATIONS, execute_once, require_isolation

from atrund.config import ExecutorSection
from atrund.execute.protocol import ExecPermissions

HOSTILE = Path(__file__).resolve().parents[1] / "hostile" / "python"
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def host_dir():
    """A world-readable directory outside /tmp (the process backend gives bundles their own /tmp,
    so files under the host's /tmp would be out of sight rather than denied): /var/tmp."""
    import shutil
    import tempfile

    d = Path(tempfile.mkdtemp(dir="/var/tmp", prefix="atrund-hostile-"))
    d.chmod(0o755)
    yield d
    shutil.rmtree(d, ignore_errors=True)


PROCESS = ("process", HELPED)
FILTERED = (*PROCESS, "container")  # the runtime's seccomp allowlist holds (gVisor applies its own kernel instead)


@pytest.fixture(params=[*ISOLATIONS, HELPED])
def isolation(request) -> str:
    return require_isolation(request)


def out_of_reach(isolation: str) -> dict:
    """How a sandboxed bundle fails to open a host file: the process backend's Landlock denies
    it; a container or a microVM has its own root, in which the host's file does not exist."""
    return {"denied": "FileNotFoundError" if isolation.startswith("container") or isolation == "microvm" else "PermissionError"}


UID_BASE = 960_000  # this suite's own sandbox uids (containers run as the first), so process counts see only its workers


async def attack(isolation: str, name: str, args=None, timeout=5, permissions=None, warm=0, **settings):
    settings.setdefault("process", {"uid_base": UID_BASE})
    settings.setdefault("container", {"uid": UID_BASE})
    return await execute_once("python", str(HOSTILE / f"{name}.py"), args=args, timeout=timeout, warm=warm,
                              permissions=permissions.model_dump() if permissions else None, isolation=isolation, **settings)


def processes_of_uid_range(base: int = UID_BASE, count: int = 256) -> list[int]:
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/status") as f:
                    uid = next(int(line.split()[1]) for line in f if line.startswith("Uid:"))
                if base <= uid < base + count:
                    pids.append(int(entry))
            except (OSError, StopIteration):
                pass
    return pids


@pytest.mark.vm
async def test_fork_bomb(isolation):
    if isolation == "none":
        pytest.skip("none cannot contain a fork bomb (RLIMIT_NPROC does not apply to root); not run, documented in README")
    r = await attack(isolation, "fork_bomb", timeout=3)
    assert not r.success
    for _ in range(50):  # the kernel tears the namespace down asynchronously
        if not processes_of_uid_range():
            break
        await asyncio.sleep(0.1)
    assert processes_of_uid_range() == [], "fork bomb processes outlived the run"


@pytest.mark.vm
async def test_memory_bomb(isolation):
    r = await attack(isolation, "memory_bomb", memory_mb=256)
    assert not r.success and r.error_type == "MemoryError"


@pytest.mark.vm
@pytest.mark.parametrize("name", ["cpu_spin", "sleep_forever"])
async def test_past_the_deadline(isolation, name):
    started = time.monotonic()
    r = await attack(isolation, name, timeout=2)
    # The wall time includes starting the worker: a VM's boot under TCG is seconds on its own.
    assert r.timed_out and time.monotonic() - started < (60 if isolation == "microvm" else 8)
    assert r.metrics.execution_time_ms == 2000


@pytest.mark.vm
async def test_output_flood(isolation):
    r = await attack(isolation, "output_flood", timeout=60)
    assert r.success and r.data == {"answer": "intact"}


async def test_fake_protocol_lines(isolation):
    r = await attack(isolation, "fake_protocol")
    assert r.success and r.data == {"real": 1}


@pytest.mark.vm
async def test_reading_the_runners_secrets(isolation, host_dir):
    secret = host_dir / "app-password"
    secret.write_text("canary-app-password")
    secret.chmod(0o600)
    r = await attack(isolation, "read_file", {"path": str(secret)})
    if isolation == "none":
        assert r.data == {"read": "canary-app-password"}  # NOT contained by none
    else:
        assert r.data == out_of_reach(isolation)


@pytest.mark.vm
async def test_reading_etc_shadow(isolation):
    r = await attack(isolation, "read_file", {"path": "/etc/shadow"})
    if isolation == "none":
        assert "read" in r.data  # NOT contained by none: the runner runs as root here
    else:
        assert r.data == {"denied": "PermissionError"}


@pytest.mark.vm
async def test_writing_outside_granted_paths(isolation, host_dir):
    host_dir.chmod(0o777)  # so only the fence, not file modes, stands in the way
    target = host_dir / "pwned"
    r = await attack(isolation, "write_outside", {"path": str(target)})
    if isolation == "none":
        assert target.exists()  # NOT contained by none
    else:
        assert r.data == out_of_reach(isolation) and not target.exists()


async def test_symlink_escape_from_a_granted_directory(isolation, host_dir):
    granted = host_dir / "granted"
    granted.mkdir()
    granted.chmod(0o777)
    outside = host_dir / "outside.txt"
    outside.write_text("outside-secret")
    outside.chmod(0o644)
    perms = ExecPermissions(read=[str(granted)], write=[str(granted)])
    r = await attack(isolation, "symlink_escape", {"granted": str(granted), "target": str(outside)}, permissions=perms)
    if isolation == "none":
        assert r.data == {"read": "outside-secret"}  # NOT contained by none
    else:
        assert r.data == out_of_reach(isolation)


@pytest.mark.vm
async def test_environment_dump(isolation):
    # /proc/PID/environ shows a process's environment as it started: use a value of ours from then.
    with open("/proc/self/environ", "rb") as f:
        ours = dict(v.split(b"=", 1) for v in f.read().split(b"\0") if b"=" in v)
    canary = ours[b"PATH"].decode()
    assert canary != "/usr/local/bin:/usr/bin:/bin", "the test needs a PATH of its own to look for"
    r = await attack(isolation, "env_dump", {"canary": canary})
    assert r.success and r.data["own"] == {}
    if isolation == "none":
        assert os.getpid() in r.data["others"]  # NOT contained by none: the runner's /proc/PID/environ
    else:
        assert r.data["others"] == []


@pytest.mark.vm
async def test_connecting_to_a_loopback_port_not_granted(isolation):
    server = await asyncio.start_server(lambda r, w: w.close(), "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        r = await attack(isolation, "connect_loopback", {"port": port})
    finally:
        server.close()
    assert r.success
    assert r.data["connected"] is (isolation == "none")  # none has no network fence


@pytest.mark.vm
async def test_signalling_the_parent_and_everyone(isolation):
    if isolation == "none":
        pytest.skip("under none, kill(-1) as root would kill the machine's processes; not run, documented in README")
    sentinel = subprocess.Popen(["sleep", "60"])
    try:
        r = await attack(isolation, "signal_parent", {"sentinel": sentinel.pid})
        assert sentinel.poll() is None, "a host process was killed by the bundle"
        assert r.success or r.error_type == "Crash"  # it may take itself down with kill(-1); the runner lives on
    finally:
        sentinel.kill()
        sentinel.wait()


async def test_lingering_child(isolation):
    tag = f"{2000 + os.getpid() % 1000}.{time.monotonic_ns() % 10**6}"
    r = await attack(isolation, "lingering_child", {"tag": tag})
    assert r.success
    await asyncio.sleep(0.3)
    left = [int(p) for p in os.listdir("/proc") if p.isdigit() and _cmdline(p) == ["sleep", tag]]
    if isolation == "none":
        assert left  # NOT contained by none: a setsid'd child leaves the process group
        for pid in left:
            os.kill(pid, 9)
    else:
        assert left == []


async def test_hijacking_a_neighbour_worker(isolation):
    r = await attack(isolation, "hijack_neighbour", warm=2)
    assert r.success
    if isolation == "none":
        assert r.data["opened"] >= 1  # NOT contained by none: workers share a uid
    else:
        assert r.data["opened"] == 0


def _cmdline(pid: str) -> list[str]:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return [p.decode() for p in f.read().split(b"\0") if p]
    except OSError:
        return []


# -- Deno and Node: the same attacks where they apply. Under none, each runtime's own permission
# model is the only fence (Deno's covers files, network, env and subprocesses; Node 22's covers
# files and subprocesses, not the network).

JS = {"deno": ".ts", "node": ".mjs"}


async def js_attack(runtime: str, isolation: str, name: str, args=None, timeout=10):
    return await execute_once(runtime, str(HOSTILE.parent / runtime / f"{name}{JS[runtime]}"), args=args, timeout=timeout,
                              isolation=isolation, process={"uid_base": UID_BASE}, container={"uid": UID_BASE})


@pytest.fixture(params=["deno", "node"])
def js(request) -> str:
    return request.param


async def test_js_reading_secrets(js, isolation, host_dir):
    secret = host_dir / "app-password"
    secret.write_text("canary")
    secret.chmod(0o600)
    for path in (str(secret), "/etc/shadow"):
        r = await js_attack(js, isolation, "read_file", {"path": path})
        assert r.success and "read" not in r.data, (path, r.data)


async def test_js_writing_outside(js, isolation, host_dir):
    host_dir.chmod(0o777)
    r = await js_attack(js, isolation, "write_outside", {"path": str(host_dir / "pwned")})
    assert r.success and "denied" in r.data and not (host_dir / "pwned").exists()


@pytest.mark.vm
async def test_js_environment_dump(js, isolation):
    with open("/proc/self/environ", "rb") as f:
        canary = dict(v.split(b"=", 1) for v in f.read().split(b"\0") if b"=" in v)[b"PATH"].decode()
    r = await js_attack(js, isolation, "env_dump", {"canary": canary})
    assert r.success and r.data["others"] == []
    assert not isinstance(r.data["own"], dict) or all(canary not in v for v in r.data["own"].values())


async def test_js_spawning_a_process(js, isolation):
    r = await js_attack(js, isolation, "spawn_process")
    assert r.success and "denied" in r.data


@pytest.mark.vm
async def test_js_connecting_to_loopback(js, isolation):
    server = await asyncio.start_server(lambda r, w: w.close(), "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        r = await js_attack(js, isolation, "connect_loopback", {"port": port})
    finally:
        server.close()
    assert r.success
    if js == "node" and isolation == "none":
        assert r.data["connected"] is True  # NOT contained: Node 22 has no network permission; none adds no fence
    else:
        assert r.data["connected"] is False


async def test_deno_granted_every_host_reaches_no_vsock(isolation):
    """Deno with a `*` grant: its permission query says `vsock:` is granted (Deno cannot deny vsock
    by wildcard), but a connect or a listen ends the bundle instead: Deno's vsock transport needs
    `--unstable-vsock`, which at-run-exec never passes. Under process and container,
    socket(AF_VSOCK) is refused by the seccomp allowlist as well (``test_a_vsock_socket``)."""
    if isolation.endswith("runsc"):
        pytest.skip("gVisor runs with --network=none here, so a network grant is refused (asserted in test_container.py)")

    async def attempt(what: str):
        return await execute_once("deno", str(HOSTILE.parent / "deno" / "vsock.ts"), args={"try": what}, timeout=10,
                                  isolation=isolation, permissions={"net": ["*"]}, process={"uid_base": UID_BASE},
                                  container={"uid": UID_BASE})

    r = await attempt("query")
    assert r.success and r.data == {"reported": "granted"}, r  # what Deno says
    for what in ("connect", "listen"):
        r = await attempt(what)
        assert not r.success and "--unstable-vsock" in r.error, (what, r)  # what it can do


async def test_js_cpu_spin(js, isolation):
    r = await js_attack(js, isolation, "cpu_spin", timeout=2)
    assert r.timed_out


async def test_deno_remote_import(isolation):
    r = await js_attack("deno", isolation, "remote_import")
    assert r.success and "imported" not in r.data.values(), r.data


@pytest.mark.vm
async def test_filling_the_disk(isolation):
    if isolation == "none":
        pytest.skip("under none the bundle writes to the host's /tmp: filling it would harm the machine; not run, documented")
    r = await attack(isolation, "disk_fill", timeout=30, tmp_mb=16)
    assert r.success and r.data["written_mb"] <= 16 and r.data["stopped_by"] == "No space left on device", r.data


async def test_a_crashed_runners_worker_mounts_are_cleaned(tmp_path):
    """A runner that died leaves tmpfs mounts under work_dir; the next one removes them, and
    leaves alone those whose uid another live runner holds."""
    from atrund.execute.process.backend import ProcessBackend, mount_tmpfs, worker_mounts

    settings = ExecutorSection(work_dir=tmp_path / "work", process={"uid_base": 950_000, "uids": 4})
    live = ProcessBackend(settings)
    held = live.uids.take()
    for uid in (950_003, held):
        d = tmp_path / "work" / f"w{uid}-left"
        d.mkdir()
        mount_tmpfs(d, 1)
    ProcessBackend(settings)  # a second runner starting on the same host
    left = [m.name for m in worker_mounts(tmp_path / "work")]
    assert left == [f"w{held}-left"]
    from atrund.execute.process.backend import unmount

    unmount(tmp_path / "work" / f"w{held}-left")


@pytest.mark.vm
async def test_connecting_to_a_world_writable_unix_socket(isolation, host_dir):
    import socket

    path = host_dir / "db.sock"
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(str(path))
    server.listen(1)
    path.chmod(0o777)
    try:
        r = await attack(isolation, "unix_socket", {"path": str(path)})
    finally:
        server.close()
    if isolation == "none":
        assert r.success and r.data["connected"] is True  # NOT contained by none
    elif isolation in FILTERED:
        assert r.error_type == "PermissionError"  # seccomp: socket(AF_UNIX) itself is refused
    else:
        assert r.success and r.data == {"connected": False, "why": "FileNotFoundError"}  # not in the container's world


async def test_creating_a_user_namespace(isolation):
    r = await attack(isolation, "user_namespace")
    assert r.success
    if isolation in (*PROCESS, "container"):
        assert r.data == {"unshared": False, "errno": 1}  # EPERM from seccomp (ours; Docker's default profile)


@pytest.mark.vm
async def test_many_processes_each_under_the_limit(isolation):
    from atrund.execute.process.backend import Cgroups

    if isolation in PROCESS and not Cgroups().available:
        pytest.skip("cgroup v1 memory/pids are not writable on this host; per-process limits only")
    r = await attack(isolation, "many_small_hogs", timeout=30, memory_mb=128, tmp_mb=16)
    if isolation == "none":
        assert r.success and r.data["survivors"] == 10  # NOT contained by none: limits are per process
    else:
        # 10 x 100 MiB against a 128 + 16 MiB cgroup: the OOM killer takes most of them (or the bundle).
        assert not r.success or r.data["survivors"] <= 2, r


async def test_a_system_call_outside_the_runtimes_allowlist(isolation):
    """personality() is on no runtime's list: under process and container it answers EPERM (the
    allowlist), where nothing filters it (none) it succeeds, so the refusal is the filter's."""
    r = await attack(isolation, "unlisted_syscall")
    assert r.success, r.error
    if isolation in FILTERED:
        assert r.data == {"result": -1, "errno": 1}
    elif isolation == "none":
        assert r.data["result"] >= 0


async def test_a_vsock_socket(isolation):
    """AF_VSOCK (to a hypervisor or other guests, outside every Landlock rule and network
    namespace): process and container refuse the socket itself, though the container has no
    network at all. Control, where the engine allows it: under the engine's own profile
    (executor.container.seccomp = "engine") Debian's Docker 20.10.24 lets the same bundle create
    one, bind it and listen (upstream moby denies AF_VSOCK since 23.0; a host without the vsock
    module has no such family: then the control shows nothing, and says so)."""
    r = await attack(isolation, "vsock")
    assert r.success, r.error
    if isolation in FILTERED:
        assert r.data == {"created": False, "why": "PermissionError", "errno": 1}
    if isolation == "container":
        r = await attack(isolation, "vsock", container={"uid": UID_BASE, "seccomp": "engine"})
        assert r.success, r.error
        if not r.data["created"]:
            assert r.data["errno"] in (1, 97), r.data  # EPERM (the engine's profile), EAFNOSUPPORT (no vsock here)
            print(f"control: the engine's own profile refuses AF_VSOCK here too ({r.data})")


async def test_a_datagram_pair_sending_to_a_host_unix_socket(isolation, host_dir):
    """socketpair(AF_UNIX, SOCK_DGRAM) then sendto() a world-writable datagram socket on the host:
    process and container make no datagram pair (EPERM), so nothing reaches the host's socket."""
    import socket

    path = host_dir / "log.sock"
    server = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    server.bind(str(path))
    path.chmod(0o777)
    server.setblocking(False)
    try:
        r = await attack(isolation, "unix_datagram", {"path": str(path)})
        try:
            received = server.recv(100)
        except BlockingIOError:
            received = None
    finally:
        server.close()
    assert r.success, r.error
    if isolation == "none":
        assert r.data == {"paired": True, "sent": True} and received == b"hello from the bundle"  # NOT contained by none
    elif isolation in FILTERED:
        assert r.data == {"paired": False, "why": "PermissionError", "errno": 1} and received is None


@pytest.mark.parametrize("fork_server", [True, False], ids=["forked", "exec"])
async def test_what_a_worker_sees_of_the_host(isolation, fork_server):
    """The host's hostname, boot id, kernel command line, load, PID 1's command line (the fence's
    spec, on the exec path), the other workers' directories in the mount table, and inotify: under
    process all hidden, with another warm worker running beside; under none all there."""
    from atrund.execute.workdir import work_root

    if isolation not in PROCESS and not fork_server:
        pytest.skip("the fork server is the process backend's")
    if isolation == HELPED and not fork_server:
        pytest.skip("a runner running as its own user has no exec path: its helper is the fork server")
    root = str(work_root(None))
    r = await attack(isolation, "host_view", {"root": root}, warm=2,
                     process={"uid_base": UID_BASE, "fork_server": fork_server})
    assert r.success, r.error
    seen = r.data
    if isolation in PROCESS:
        assert seen["hostname"] == "atrund" and seen["hostname"] != socket_hostname()
        assert (seen["boot_id"], seen["cmdline"], seen["loadavg"]) == ("", "", ""), seen
        assert seen["init_cmdline"] == "FileNotFoundError" and 1 not in seen["pids"], seen
        assert seen["worker_mounts"] == [], seen
        assert seen["inotify"] == "EPERM", seen
    elif isolation == "none":
        assert seen["hostname"] == socket_hostname() and seen["boot_id"] and seen["loadavg"]
        assert seen["inotify"] == "ok"


def socket_hostname() -> str:
    import socket

    return socket.gethostname()


async def test_stat_into_the_runners_state_directory(isolation, tmp_path):
    """stat() is outside Landlock, so a file's mode is the fence: a state directory the runner
    made (app.private_dir: 0700) hides its files from a worker's uid under process, where one
    left 0755 (the control) does not."""
    from atrund.app import private_dir

    state, control = Path("/var/tmp") / f"atrund-state-{os.getpid()}", Path("/var/tmp") / f"atrund-open-{os.getpid()}"
    try:
        state.mkdir(mode=0o755)
        private_dir(state)
        control.mkdir(mode=0o755)
        control.chmod(0o755)
        for d in (state, control):
            (d / "atrund.sqlite3").write_bytes(b"")
        r = await attack(isolation, "stat_host", {"paths": [str(state / "atrund.sqlite3"), str(control / "atrund.sqlite3")]})
    finally:
        import shutil

        shutil.rmtree(state, ignore_errors=True)
        shutil.rmtree(control, ignore_errors=True)
    assert r.success, r.error
    if isolation in PROCESS:
        assert r.data == {str(state / "atrund.sqlite3"): "PermissionError", str(control / "atrund.sqlite3"): "seen"}, r.data
    elif isolation == "none":
        assert set(r.data.values()) == {"seen"}
