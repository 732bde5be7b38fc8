"""The privileged helper of a runner running as its own user (`[runner] user`): the process
backend's fork server with a policy (forkserver.Policy). A compromised runner may send it
anything; these tests send what such a runner would, and the helper must refuse every request
the policy does not allow, and go on serving. Under microvm it also starts QEMU, from the
command its policy holds (microvm/helped.py).

The helper is real (started as an unprivileged runner starts it, with a policy); the test
process plays the compromised runner on its socket.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
from pathlib import Path

import pytest

from atrund.config import ExecutorSection
from atrund.execute.base import ExecutorError
from atrund.execute.microvm.backend import monitor_policy
from atrund.execute.process.backend import privileged_helper, worker_mounts

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="the helper is root's")
UID_BASE = 955_000


@pytest.fixture
async def helper(tmp_path):
    work = tmp_path / "work"
    work.mkdir(mode=0o711)
    allowed = tmp_path / "allowed"
    allowed.mkdir()
    settings = ExecutorSection(isolation="process", work_dir=work, process={"uid_base": UID_BASE, "uids": 4})
    server = privileged_helper(settings, True, [str(allowed)], [], os.geteuid(), os.getegid())
    await server.start()
    yield server, work, allowed
    for mount in worker_mounts(work):
        await server.unmount(mount.name)
    await server.close()


async def refused(server, request: dict, why: str) -> None:
    with pytest.raises(ExecutorError, match=why):
        await server.call(request)


async def test_worker_directories_are_named_not_given(helper, tmp_path):
    """A mount is asked by name, ``w{uid}-{random}`` with a uid of the runner's range, in the work
    root the policy fixed: a path, a name of another uid, ``..`` and a symlink planted in the work
    root (which the runner owns) are refused; the one good name is mounted, and detached."""
    server, work, _ = helper
    outside = tmp_path / "outside"
    outside.mkdir()
    (work / f"w{UID_BASE}-link").symlink_to(outside)
    for name in ("/etc", "../etc", f"w{UID_BASE}-a/../../etc", "w1000-abc", f"w{UID_BASE + 4}-abc", "w-abc"):
        await refused(server, {"mount": name, "size_mb": 8}, "not a worker directory name")
    await refused(server, {"mount": f"w{UID_BASE}-link", "size_mb": 8}, "Not a directory|symbolic links")
    await refused(server, {"mount": f"w{UID_BASE}-abc", "size_mb": -1}, "size_mb")
    assert not [m for m in worker_mounts(tmp_path)], "nothing was mounted"
    (work / f"w{UID_BASE}-good").mkdir()
    await server.mount(f"w{UID_BASE}-good", 8)
    assert [m.name for m in worker_mounts(work)] == [f"w{UID_BASE}-good"]
    await server.unmount(f"w{UID_BASE}-good")
    assert worker_mounts(work) == []


def _spec(work: Path, **changes) -> dict:
    spec = {"runtime": "python", "uid": UID_BASE, "gid": UID_BASE, "workdir": str(work / f"w{UID_BASE}-abc"),
            "grant_read": [], "grant_write": [], "ports": [], "cgroups": False,
            "rlimits": {"DATA": 1 << 30, "CPU": 10, "FSIZE": 1 << 20, "NOFILE": 64, "NPROC": 16, "CORE": 0}}
    return {**spec, **changes}


@pytest.mark.parametrize(("change", "why"), [
    ({"uid": 0, "gid": 0}, "not a worker uid"),
    ({"uid": 1000, "gid": 1000}, "not a worker uid"),
    ({"gid": 0}, "not a worker uid"),
    ({"runtime": "sh"}, "not a runtime of this runner"),
    ({"workdir": "/etc"}, "not a worker directory name"),
    ({"workdir": f"/somewhere/w{UID_BASE + 1}-abc"}, "is not uid"),
    ({"grant_read": ["/etc"]}, "/etc is not within what the operator grants"),
    ({"grant_write": ["/"]}, "/ is not within what the operator grants"),
    ({"ports": [70000]}, "ports must be"),
    ({"rlimits": {"CPU": 1}}, "rlimits must set exactly"),
])
async def test_a_spawn_outside_the_policy_is_refused(helper, change, why):
    """A spawn names a runtime, a uid, a worker directory, grants, ports and limits: each is
    checked, and the command, paths and environment come from the policy, never the request."""
    server, work, _ = helper
    fds = [fd for pair in (os.pipe(), os.pipe()) for fd in pair][:3]
    try:
        with pytest.raises(ExecutorError, match=why):
            await server.spawn(_spec(work, **change), False, fds)
    finally:
        for fd in fds:
            os.close(fd)
    assert not server.gone


async def test_a_grant_within_the_operators_roots_passes_the_policy(helper):
    """The control for the refusals above: the same spawn with a granted path inside what the
    operator allows is not refused by the policy (it fails later: the worker directory was never
    made, which the fence says on the worker's stdout)."""
    server, work, allowed = helper
    read, write = os.pipe()
    fds = [read, write, write]
    try:
        _, _, exited = await server.spawn(_spec(work, grant_read=[str(allowed)]), False, fds)
        assert await asyncio.wait_for(exited, 10) == 70  # fence.fail: no worker directory
    finally:
        os.close(read)
        os.close(write)


async def test_network_namespaces_only_of_containers(helper):
    """A namespace for a container is asked by its id and its init's pid: a pid that is not in
    that container (here: this test process, in the host's namespace), a malformed id, pid 1, and
    bad ports or nameservers are refused: the helper never sets up the host's own namespace."""
    server, _, _ = helper
    cid = "a" * 64
    await refused(server, {"netns": {"ports": [443], "container": cid, "pid": os.getpid()}}, "is not in container")
    await refused(server, {"netns": {"ports": [443], "container": cid, "pid": 1}}, "is named by its 64-hex id")
    await refused(server, {"netns": {"ports": [443], "container": "abc", "pid": os.getpid()}}, "is named by its 64-hex id")
    await refused(server, {"netns": {"ports": [0], "servers": []}}, "ports must be")
    await refused(server, {"netns": {"ports": [443], "servers": ["resolver.example"]}}, "not a nameserver address")
    ns = await server.netns([443], ["127.0.0.53"])  # the control: a new namespace is made
    assert len(ns.listeners) == 1 and len(ns.dns) == 1
    assert os.fstat(ns.fd).st_ino != os.stat("/proc/self/ns/net").st_ino
    ns.close()


async def test_only_its_own_workers_can_be_killed(helper):
    """`kill` names a pid: the helper signals only the workers it forked, never another process."""
    server, _, _ = helper
    sentinel = subprocess.Popen(["sleep", "60"])
    try:
        server.sock.send(json.dumps({"kill": sentinel.pid}).encode())
        await refused(server, {"what": "else"}, "not a request this server knows")  # a round trip after the kill
        assert sentinel.poll() is None
    finally:
        sentinel.kill()
        sentinel.wait()


@pytest.fixture
async def vm_helper(tmp_path, vm_guest, request):
    """The helper of an unprivileged microvm runner: no workers to fork, QEMU's commands in its policy."""
    work = tmp_path / "work"
    work.mkdir(mode=0o711)
    settings = ExecutorSection(isolation="microvm", work_dir=work, process={"uid_base": UID_BASE, "uids": 4},
                               microvm={"accelerator": "tcg", "kernel": vm_guest["kernel"],
                                        "initramfs": vm_guest["initramfs"], "rootfs": vm_guest["rootfs"]})
    server = privileged_helper(settings, False, [], [], os.geteuid(), os.getegid())
    server.policy.update(monitor_policy(settings))
    if limit := getattr(request, "param", None):
        server.policy["monitor_limit"] = limit
    await server.start()
    yield server
    await server.close()


def _children(pid: int) -> list[int]:
    return [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]


def _uid(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return int(next(line.split()[1] for line in f if line.startswith("Uid:")))


async def _monitor_of(init: int) -> int:
    """The QEMU under a monitor's init, once it has dropped to nobody (after its set-up)."""
    for _ in range(100):
        qemu = _children(init)
        if qemu and _uid(qemu[0]) != 0:
            return qemu[0]
        await asyncio.sleep(0.05)
    raise AssertionError("QEMU did not drop root")


async def test_a_monitor_is_started_only_from_the_policys_command(vm_helper):
    """A monitor request names a runtime and a grant's ports, nothing else: an unknown runtime,
    bad ports, and a request carrying descriptors are refused. The control: QEMU runs with
    exactly the policy's command (plus the ports, as numbers, on the guest's command line),
    as nobody, and the runner gets the VM's channel and console, and can have it killed."""
    server = vm_helper
    await refused(server, {"monitor": {"runtime": "sh", "ports": []}}, "not a runtime of this runner")
    await refused(server, {"monitor": {"runtime": "../python", "ports": []}}, "not a runtime of this runner")
    await refused(server, {"monitor": "python"}, "not a runtime of this runner")
    await refused(server, {"monitor": {"runtime": "python", "ports": [70000]}}, "ports must be")
    await refused(server, {"monitor": {"runtime": "python", "ports": "443 -device evil"}}, "ports must be")
    read, write = os.pipe()
    try:  # a descriptor (a disk image, a socket) cannot be smuggled in with the request
        with pytest.raises(ExecutorError, match="only a spawn carries descriptors"):
            await server._ask({"monitor": {"runtime": "python", "ports": []}}, [read], "start a monitor", call=True)
    finally:
        os.close(read)
        os.close(write)
    assert not server.gone
    pid, pidfd, exited, (channel, console) = await server.monitor("python", [8443])
    try:
        qemu = await _monitor_of(pid)
        assert _uid(qemu) == 65534  # nobody, as QEMU's -runas drops to
        argv = Path(f"/proc/{qemu}/cmdline").read_bytes().decode().split("\0")[:-1]
        expected = list(server.policy["monitors"]["python"])
        at = expected.index("-append") + 1
        expected[at] += " atrun.net=8443"
        assert argv == expected
        assert os.fstat(channel).st_mode & 0o170000 == 0o140000  # a socket, connected to the VM's port
        server.kill(pid, pidfd)
        assert await asyncio.wait_for(exited, 10) is not None
        assert not Path(f"/proc/{qemu}").exists() or _stat_state(qemu) == "Z"
    finally:
        server.live.pop(pid, None)  # as the runner does once its monitor is dead (helped.HelpedMonitor.release)
        for fd in (pidfd, channel, console):
            os.close(fd)


def _stat_state(pid: int) -> str:
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]


async def test_monitors_die_with_the_helper(vm_helper):
    """A runner that crashes takes its helper with it (the helper's parent-death signal), and the
    helper its monitors, although QEMU dropped to nobody (which clears QEMU's own): the monitor's
    init stays root with the signal set, and its PID namespace goes with it."""
    server = vm_helper
    pid, pidfd, _, fds = await server.monitor("python", [])
    qemu = await _monitor_of(pid)
    server.stop()  # SIGKILL, as the parent-death signal sends
    for _ in range(100):
        if not Path(f"/proc/{qemu}").exists() or _stat_state(qemu) == "Z":
            break
        await asyncio.sleep(0.05)
    else:
        raise AssertionError("QEMU outlived the helper")
    server.live.pop(pid, None)
    for fd in (pidfd, *fds):
        os.close(fd)


async def test_a_process_runners_helper_starts_no_monitor(helper):
    """The helper of a process runner has no monitor command in its policy: it starts none."""
    server, _, _ = helper
    await refused(server, {"monitor": {"runtime": "python", "ports": []}}, "starts no virtual machines")


@pytest.mark.parametrize("vm_helper", [1], indirect=True)
async def test_monitors_are_bounded_in_number(vm_helper):
    """The policy bounds how many monitors run at once (each is bounded in memory): past it a
    request is refused; once one is killed (and reaped), the next starts (the control)."""
    server = vm_helper
    pid, pidfd, exited, fds = await server.monitor("python", [])
    await refused(server, {"monitor": {"runtime": "python", "ports": []}}, "1 monitors are running: the policy allows 1")
    server.kill(pid, pidfd)
    await asyncio.wait_for(exited, 10)
    again, again_fd, again_exited, again_fds = await server.monitor("python", [])
    server.kill(again, again_fd)
    await asyncio.wait_for(again_exited, 10)
    for p in (pid, again):
        server.live.pop(p, None)
    for fd in (pidfd, *fds, again_fd, *again_fds):
        os.close(fd)
