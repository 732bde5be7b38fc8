"""The Firecracker driver, without Firecracker (no binary can be installed here): every request it
builds is checked against Firecracker's own OpenAPI description, and the whole start-up (API
calls over the Unix socket, the guest dialling back over vsock's host socket, the framed
channel) runs against tests/standins/firecracker, which checks each request as it arrives."""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
import tempfile
from pathlib import Path

import jsonschema
import pytest
import yaml
from conftest import execute_once

from atrund.execute import ExecutorError
from atrund.execute.microvm.firecracker import requests
from atrund.execute.microvm.vm import VmSpec

API_YAML = Path(os.environ.get("FIRECRACKER_API_YAML", Path(__file__).resolve().parents[2] / "firecracker" / "firecracker-api.yaml"))
STANDIN = Path(__file__).resolve().parents[2] / "standins" / "firecracker"


@pytest.fixture(scope="module")
def api() -> dict:
    if not API_YAML.exists():
        pytest.skip(f"Firecracker's API description is not at {API_YAML} (set FIRECRACKER_API_YAML)")
    return yaml.safe_load(API_YAML.read_text())


def violations(api: dict, method: str, path: str, body: dict) -> list[str]:
    """What is wrong with one request by Firecracker's OpenAPI (Swagger 2.0) description."""
    for template, ops in api["paths"].items():
        if re.fullmatch(re.sub(r"\{[^}]+\}", "[^/]+", template), path) and method.lower() in ops:
            op = ops[method.lower()]
            break
    else:
        return [f"no such call {method} {path}"]
    schema = next(p["schema"] for p in op["parameters"] if p["in"] == "body")
    validator = jsonschema.Draft4Validator({**schema, "definitions": api["definitions"]})
    return [e.message for e in validator.iter_errors(body)]


def spec(tmp_path: Path, **changes) -> VmSpec:
    fields = dict(dir=tmp_path / "vm-1_2-python-abcd", kernel=Path("/var/cache/atrund/vm/vmlinux"),
                  initramfs=Path("/var/cache/atrund/vm/initramfs.img"), rootfs=Path("/var/cache/atrund/vm/rootfs.ext4"),
                  memory_mb=704, vcpus=2, cmdline="console=ttyS0 quiet atrun.runtime=python")
    return VmSpec(**{**fields, **changes})


@pytest.mark.parametrize("root", ["", "/"], ids=["direct", "jailed"])
def test_every_request_conforms_to_firecrackers_api(api, tmp_path, root):
    calls = requests(spec(tmp_path), root)
    assert [c[1] for c in calls] == ["/machine-config", "/boot-source", "/drives/rootfs", "/vsock", "/entropy", "/actions"]
    for method, path, body in calls:
        assert violations(api, method, path, body) == [], (path, body)
    bodies = {path: body for _, path, body in calls}
    assert bodies["/drives/rootfs"]["is_read_only"] is True  # every VM shares the one image: never writable
    assert bodies["/machine-config"] == {"vcpu_count": 2, "mem_size_mib": 704, "smt": False}
    assert bodies["/actions"] == {"action_type": "InstanceStart"}
    if root:  # under the jailer, paths are inside its chroot
        assert bodies["/boot-source"]["kernel_image_path"] == "/vmlinux" and bodies["/vsock"]["uds_path"] == "/vsock.sock"


def test_no_network_interface_is_ever_configured(tmp_path):
    assert not any(path.startswith("/network-interfaces") for _, path, _ in requests(spec(tmp_path)))


def test_the_check_is_not_vacuous(api):
    """The validator rejects what Firecracker would: so the conformance test above can fail."""
    assert violations(api, "PUT", "/machine-config", {"vcpu_count": 0, "mem_size_mib": 128})
    assert violations(api, "PUT", "/drives/rootfs", {"path_on_host": "/x", "is_read_only": True})  # no drive_id, is_root_device
    assert violations(api, "PUT", "/vsock", {"guest_cid": 2, "uds_path": "/v"})  # CID 2 is the host's
    assert violations(api, "PUT", "/boot-source", {"kernel_image_path": 7})
    assert violations(api, "PUT", "/nonexistent", {}) == ["no such call PUT /nonexistent"]


@pytest.fixture
def standin(tmp_path, api, monkeypatch, request) -> dict:
    """Settings for the backend with the stand-in as the firecracker binary, dummy guest files."""
    binary = tmp_path / "firecracker"
    binary.write_text(f"#!{sys.executable}\n" + STANDIN.read_text())
    binary.chmod(0o755)
    # Unix socket paths have at most 107 bytes; pytest's tmp_path is too deep for the VM's sockets.
    work = Path(tempfile.mkdtemp(prefix="atrund-fc-", dir="/tmp"))
    request.addfinalizer(lambda: shutil.rmtree(work, ignore_errors=True))
    files = {}
    for name in ("vmlinux", "initramfs.img", "rootfs.ext4"):
        (tmp_path / name).write_bytes(b"not booted")
        files[name] = tmp_path / name
    monkeypatch.setenv("FIRECRACKER_API_YAML", str(API_YAML))
    monkeypatch.setenv("STANDIN_LOG", str(tmp_path / "calls.jsonl"))
    return dict(isolation="microvm", work_dir=work, microvm=dict(
        monitor="firecracker", firecracker_binary=str(binary), kernel=files["vmlinux"], initramfs=files["initramfs.img"],
        rootfs=files["rootfs.ext4"]))


async def test_a_request_travels_through_the_api_and_vsock(standin, tmp_path):
    bundle = tmp_path / "b.py"
    bundle.write_text("def main(args): return args\n")
    r = await execute_once("python", str(bundle), args={"x": 1}, **standin)
    assert r.success, r.error
    assert r.data["bundle"] == "bundle.py" and r.data["bytes"] == bundle.stat().st_size
    assert r.data["request"]["codePath"] == "/bundle/bundle.py" and r.data["request"]["args"] == {"x": 1}
    calls = [json.loads(line) for line in (tmp_path / "calls.jsonl").read_text().splitlines()]
    assert [c[1] for c in calls][-1] == "/actions"
    assert "atrun.vsock=1024" in next(c[2]["boot_args"] for c in calls if c[1] == "/boot-source")
    assert list((Path(standin["work_dir"]) / "vms").iterdir()) == []  # the VM's directory went with it


async def test_a_refused_request_names_the_call_and_the_fault(standin, monkeypatch):
    monkeypatch.setenv("STANDIN_REFUSE", "/boot-source")
    with pytest.raises(ExecutorError, match=r"firecracker refused PUT /boot-source \(400\): refused by the stand-in"):
        await execute_once("python", "/nonexistent.py", **standin)
