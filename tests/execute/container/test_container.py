"""The container backend's own guarantees, on a real Docker engine (no mocks): how each worker
container is hardened, what a bundle sees from inside, leftovers of a dead runner, a container
or the whole engine dying mid-run, and a runner serving invocations end to end with it.

The executor contract and the hostile suite run on this backend too (test_executor.py,
test_hostile.py); this file holds what only a container backend has.
"""

import asyncio
import contextlib
import gc
import json
import os
import signal
import subprocess
import textwrap
from pathlib import Path

import docker
import pytest
from conftest import executor_settings, require_isolation, wait_result

from atrund.errors import ImageError
from atrund.execute import ExecRequest, ExecutorError, create_executor
from atrund.execute.container.backend import LABEL_OWNER, LABEL_WORKER, OWNER, RUNSC_PIDS_OVERHEAD

ROOT = Path(__file__).resolve().parents[3]


@pytest.fixture(params=["container", "container+runsc"])
def isolation(request) -> str:
    return require_isolation(request)


@pytest.fixture
def client(container_engine):
    c = docker.from_env()
    yield c
    c.close()


def bundle(tmp_path: Path, source: str) -> str:
    path = tmp_path / "bundle.py"
    path.write_text(textwrap.dedent(source))
    return str(path)


def ours(client) -> list:
    """This test process's worker containers, any state."""
    return client.containers.list(all=True, filters={"label": f"{LABEL_OWNER}={OWNER}"})


async def test_a_worker_container_is_hardened(isolation, client):
    """Every hardening option reaches the engine: caps, read-only root, no-new-privileges, no
    network, limits from the configuration, unprivileged user, read-only bundle mount, labels."""
    executor = create_executor(executor_settings(isolation, warm=1, memory_mb=200, tmp_mb=8, max_processes=32, container={"cpus": 0.5}))
    await executor.warm(1)
    try:
        worker = executor._warm["python"][0].worker
        attrs = client.api.inspect_container(worker.id)
    finally:
        await executor.shutdown()
    host, cfg = attrs["HostConfig"], attrs["Config"]
    assert host["CapDrop"] == ["ALL"] and not host["CapAdd"] and host["Privileged"] is False
    assert host["ReadonlyRootfs"] is True and host["NetworkMode"] == "none"
    assert "no-new-privileges" in host["SecurityOpt"] and not any("unconfined" in o for o in host["SecurityOpt"])
    profile = json.loads(next(o for o in host["SecurityOpt"] if o.startswith("seccomp="))[len("seccomp="):])
    assert (profile["defaultAction"], profile["defaultErrnoRet"]) == ("SCMP_ACT_ERRNO", 1)  # the allowlist: the rest EPERM
    assert "personality" not in json.dumps(profile) and "read" in profile["syscalls"][0]["names"]
    assert host["Memory"] == host["MemorySwap"] == (200 + 8) << 20 and host["NanoCpus"] == 500_000_000
    assert host["PidsLimit"] == 32 + (RUNSC_PIDS_OVERHEAD if isolation.endswith("runsc") else 0)
    assert host["Tmpfs"] == {"/tmp": "rw,nosuid,nodev,noexec,size=8m,mode=1777"}
    assert host["Runtime"] == ("runsc" if isolation.endswith("runsc") else "runc") and host["Init"] is True
    assert host["LogConfig"]["Type"] == "none"
    assert [(m["Target"], m["ReadOnly"]) for m in host["Mounts"]] == [("/bundle", True)]
    assert cfg["User"] == "900000:900000" and cfg["Labels"][LABEL_WORKER] == "python" and cfg["Labels"][LABEL_OWNER] == OWNER
    assert ours(client) == [], "shutdown() left containers behind"


async def test_what_a_bundle_sees_from_inside(isolation, tmp_path):
    """From inside: an unprivileged uid with no capabilities, a read-only root and bundle, a
    private /tmp, loopback only."""
    from conftest import execute_once

    r = await execute_once("python", bundle(tmp_path, """
        import os
        def _interfaces():  # the network namespace's devices (if_nameindex binds a netlink socket: not on the allowlist)
            return sorted(l.split(":")[0].strip() for l in open("/proc/net/dev").read().splitlines()[2:])
        def _errno(path):
            try:
                open(path, "w").close()
                return 0
            except OSError as e:
                return e.errno
        def main(args):
            status = dict(l.split(":", 1) for l in open("/proc/self/status").read().splitlines() if ":" in l)
            return {
                "uid": os.getuid(),
                "cap_eff": int(status["CapEff"].strip(), 16),
                "no_new_privs": status.get("NoNewPrivs", "").strip(),
                "root_write": _errno("/usr/pwned"),
                "root_mount": [l.split()[3].split(",")[0] for l in open("/proc/self/mounts") if l.split()[1] == "/"],
                "bundle_write": _errno(__file__),
                "tmp_write": _errno("/tmp/fine"),
                "interfaces": _interfaces(),
            }
    """), isolation=isolation)
    assert r.success, r.error
    d = r.data
    assert d["uid"] == 900_000 and d["cap_eff"] == 0
    assert d["root_mount"] == ["ro"] and d["root_write"] in (13, 30) and d["bundle_write"] in (13, 30)  # EACCES, EROFS
    assert d["tmp_write"] == 0
    assert d["interfaces"] == ["lo"]
    if isolation == "container":
        assert d["no_new_privs"] == "1"  # gVisor's /proc does not show the flag


async def test_network_is_there_only_when_granted(isolation, tmp_path):
    """No container is on the engine's bridge: one granted network has loopback only too, whose
    only way out is the runner's egress proxy (what it reaches is asserted in
    tests/execute/test_egress.py). Under gVisor there is no network here at all, and the
    request says so."""
    from conftest import execute_once

    source = bundle(tmp_path, "def main(args):\n    return sorted(l.split(':')[0].strip() for l in open('/proc/net/dev').read().splitlines()[2:])\n")
    granted = {"net": ["example.com"]}
    if isolation.endswith("runsc"):
        with pytest.raises(ExecutorError, match="network grants are not available with runtime runsc"):
            await execute_once("python", source, isolation=isolation, permissions=granted)
        return
    r = await execute_once("python", source, isolation=isolation, permissions=granted)
    assert r.success and r.data == ["lo"]


async def test_drain_lets_the_running_request_finish_and_leaves_no_containers(isolation, client, tmp_path):
    """drain(): the request in flight still gets its answer; then no container of ours is left,
    warm ones included, before shutdown() is even called."""
    executor = create_executor(executor_settings(isolation, warm=2))
    await executor.warm(2)
    try:
        request = ExecRequest(code_path=bundle(tmp_path, "import time\ndef main(a):\n    time.sleep(1)\n    return 'done'\n"),
                              endpoint="main")
        running = asyncio.ensure_future(executor.execute(request, "python"))
        await asyncio.sleep(0.2)
        await executor.drain()
        r = await running
        assert r.success and r.data == "done"
        assert ours(client) == []
        with pytest.raises(ExecutorError, match="shut down"):
            await executor.execute(request, "python")
    finally:
        await executor.shutdown()


async def test_leftovers_of_a_dead_runner_are_removed_and_a_live_ones_kept(isolation, client, tmp_path):
    """A runner that crashed leaves labelled containers; the next one removes them on start-up,
    and leaves alone those of a runner that still runs (two runners may share an engine)."""
    image = executor_settings(isolation).container.image
    dead = client.containers.create(image, ["sleep", "60"], labels={LABEL_OWNER: "1:0", LABEL_WORKER: "python"})
    live = client.containers.create(image, ["sleep", "60"], labels={LABEL_OWNER: OWNER, LABEL_WORKER: "python"})
    try:
        executor = create_executor(executor_settings(isolation, warm=0))
        r = await executor.execute(ExecRequest(code_path=bundle(tmp_path, "def main(a): return 1"), endpoint="main"), "python")
        await executor.shutdown()
        assert r.success
        left = {c.id for c in client.containers.list(all=True)}
        assert dead.id not in left and live.id in left
    finally:
        for c in (dead, live):
            with contextlib.suppress(docker.errors.NotFound):
                c.remove(force=True)


async def test_a_container_killed_mid_run_is_explained_and_the_pool_recovers(isolation, client, tmp_path):
    """Someone (the operator, the engine's OOM handling) kills the container while the bundle
    runs: the invocation ends in an explained crash, and the next one runs normally."""
    executor = create_executor(executor_settings(isolation, warm=1))
    await executor.warm(1)
    try:
        slow = ExecRequest(code_path=bundle(tmp_path, "import time\ndef main(a):\n    time.sleep(30)\n"), endpoint="main", timeout=60)
        taken = executor._warm["python"][0].worker.id  # ready and waiting: the request goes straight in
        running = asyncio.ensure_future(executor.execute(slow, "python"))
        await asyncio.sleep(1.0)
        client.containers.get(taken).kill()
        r = await asyncio.wait_for(running, 20)
        assert r.error_type == "Crash" and r.error.startswith("the bundle process was killed by SIGKILL before answering"), r.error
        ok = await executor.execute(ExecRequest(code_path=bundle(tmp_path, "def main(a): return 2"), endpoint="main"), "python")
        assert ok.success and ok.data == 2
    finally:
        await executor.shutdown()
    assert ours(client) == []


def _dockerd_pid() -> int:
    return int(Path("/var/run/docker.pid").read_text())


async def test_the_engine_dying_mid_run_is_explained_and_the_pool_recovers(client, tmp_path):
    """dockerd is killed (SIGKILL) while a bundle runs: the invocation fails with an error that
    names the engine, not the bundle; warm refills fail quietly while it is gone; once it is back
    the same executor serves again, and removes what it could not remove meanwhile."""
    if not Path("/var/run/docker.pid").exists():
        pytest.skip("the Docker engine here was not started by scripts/dockerd (no /var/run/docker.pid to kill)")
    executor = create_executor(executor_settings("container", warm=1))
    await executor.warm(1)
    try:
        slow = ExecRequest(code_path=bundle(tmp_path, "import time\ndef main(a):\n    time.sleep(30)\n"), endpoint="main", timeout=60)
        running = asyncio.ensure_future(executor.execute(slow, "python"))
        await asyncio.sleep(1.0)  # the request is in the warm worker
        os.kill(_dockerd_pid(), signal.SIGKILL)
        with pytest.raises(ExecutorError, match="container worker was lost before it answered: the container engine"):
            await asyncio.wait_for(running, 30)
        await asyncio.sleep(0.5)
        subprocess.run(["bash", str(ROOT / "scripts/dockerd")], check=True, capture_output=True, timeout=60)
        ok = await executor.execute(ExecRequest(code_path=bundle(tmp_path, "def main(a): return 3"), endpoint="main"), "python")
        assert ok.success and ok.data == 3
    finally:
        await executor.shutdown()
        gc.collect()  # a socket left open while the engine was down would show up here (as an error)
    assert ours(client) == [], "containers of the dead engine were not removed"


async def test_a_runner_with_container_isolation_serves_invocations(author, make_runner, reader):
    """End to end on the local PDS: invocation record in, container run, result record out."""
    from atrund.records import Result

    runner = await make_runner(access={"allowlist": [author.account.did]}, executor={"isolation": "container", "warm": 1})
    bundle_ref = await author.publish("def main(args):\n    print('noise')\n    return {'hi': args['name']}\n")
    uri = await author.invoke(bundle_ref, runner.did, "main", {"name": "ada"})
    result = Result.model_validate(await wait_result(reader, runner.did, uri))
    assert result.status == "success" and result.data == {"hi": "ada"}
    assert result.metrics.isolation == "container"
    deno = await author.publish("export function main(args: {n: number}) { return args.n * 2; }\n", runtime="deno")
    value = await wait_result(reader, runner.did, await author.invoke(deno, runner.did, "main", {"n": 21}))
    assert value["status"] == "success" and Result.model_validate(value).value() == 42


async def test_missing_image_is_a_clear_error(container_engine):
    executor = create_executor(executor_settings("container", warm=0, container={"image": "atrund-no-such-image:nope"}))
    try:
        with pytest.raises(ExecutorError, match="has no image atrund-no-such-image:nope: build it with `atrund image build`"):
            await executor.execute(ExecRequest(code_path="/x", endpoint="main"), "python")
    finally:
        await executor.shutdown()



async def test_auto_takes_a_gvisor_container_first_and_process_before_a_runc_one(container_engine):
    """auto: a microVM comes first, but only where KVM really boots one (here only TCG does, so
    auto passes it over); then with runtime = "runsc" the container backend is the strongest;
    with runc, process comes first (a wall of the same kind that starts faster) and container
    after it."""
    from atrund.config import ExecutorSection
    from atrund.execute.probe import order

    assert order(ExecutorSection(container={"runtime": "runc"})) == ("microvm", "process", "container", "none")
    assert order(ExecutorSection(container={"runtime": "runsc"})) == ("microvm", "container", "process", "none")
    if "runsc" not in container_engine["Runtimes"]:
        pytest.skip("the Docker engine has no runsc runtime (bash scripts/dockerd registers it)")
    executor = create_executor(ExecutorSection(isolation="auto", container={"runtime": "runsc"}, warm=0))
    try:
        assert executor.isolation == "container"
    finally:
        await executor.shutdown()


def _atrund(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    import sys

    return subprocess.run([sys.executable, "-m", "atrund.cli", *args], capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, cwd=ROOT, timeout=300)


def test_image_build_is_tagged_by_its_inputs_and_a_rerun_is_quick(container_engine):
    """`atrund image build` prints the content-hash tag; with nothing changed it only re-tags."""
    import json
    import time as clock

    started = clock.monotonic()
    p = _atrund("image", "build")
    assert p.returncode == 0, p.stderr
    out = json.loads(p.stdout)
    assert out["image"].startswith("atrund-runtime:") and len(out["image"].split(":")[1]) == 16
    assert out["tags"] == [out["image"], "atrund-runtime:latest"]
    assert "already built from these inputs" in p.stderr and clock.monotonic() - started < 60


def test_image_build_without_an_engine_says_where_it_looked(tmp_path):
    p = _atrund("image", "build", env={"DOCKER_HOST": f"unix://{tmp_path}/no.sock"})
    assert p.returncode == ImageError.exit_code and f"no Docker engine answers at unix://{tmp_path}/no.sock" in p.stderr


def test_the_image_hash_covers_the_runtime_programs(tmp_path):
    """A changed at-run-exec gives another runtimes label (the backend then refuses the image)
    and another image tag."""
    import shutil

    from atrund.execute.container import image

    runtimes = tmp_path / "runtimes"
    shutil.copytree(ROOT / "nix/runtimes", runtimes)
    before = image.runtimes_hash(runtimes), image.content_hash(image.additions(runtimes))
    with open(runtimes / "python/at-run-exec", "a") as f:
        f.write("# changed\n")
    after = image.runtimes_hash(runtimes), image.content_hash(image.additions(runtimes))
    assert before[0] != after[0] and before[1] != after[1]
