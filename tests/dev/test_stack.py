"""The local stack is a real PDS + PLC, reachable from the atproto SDK, on loopback only."""

from __future__ import annotations

import json
import os
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from atproto import Client, models

from atrund.dev.stack import LocalStack


def _get_json(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=10) as response:
        return json.load(response)


def _listening_addresses(pid: int) -> list[tuple[str, int]]:
    """(hex address, port) of every TCP socket the process listens on, from /proc."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except FileNotFoundError:  # closed meanwhile
            continue
        if target.startswith("socket:["):
            inodes.add(target[len("socket:["):-1])
    found = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for row in Path(table).read_text().splitlines()[1:]:
            fields = row.split()
            local, state, inode = fields[1], fields[3], fields[9]
            if state == "0A" and inode in inodes:  # 0A = LISTEN
                address, port = local.split(":")
                found.append((address, int(port, 16)))
    return found


pytestmark = pytest.mark.stack

LOOPBACK = {"0100007F", "00000000000000000000000001000000"}  # 127.0.0.1, ::1


def test_local_stack() -> None:
    with LocalStack() as stack:
        assert stack.pid is not None
        alice = stack.create_account("alice")
        bob = stack.create_account("bob")
        assert (alice.handle, bob.handle) == ("alice.test", "bob.test")
        assert alice.did.startswith("did:plc:") and alice.did != bob.did

        described = _get_json(f"{stack.pds_url}/xrpc/com.atproto.server.describeServer")
        assert described["availableUserDomains"] == [".test"]

        for account in (alice, bob):
            doc = _get_json(f"{stack.plc_url}/{account.did}")
            assert doc["id"] == account.did
            assert doc["alsoKnownAs"] == [f"at://{account.handle}"]
            assert doc["service"][0]["serviceEndpoint"] == stack.pds_url

        client = Client(base_url=alice.pds_url)
        client.login(alice.handle, alice.app_password, fetch_bsky_profile=False)
        created = client.com.atproto.repo.create_record(
            models.ComAtprotoRepoCreateRecord.Data(
                repo=alice.did,
                collection="dev.atrun.test",
                record={"$type": "dev.atrun.test", "text": "hello"},
            )
        )
        assert created.uri.startswith(f"at://{alice.did}/dev.atrun.test/")
        rkey = created.uri.rsplit("/", 1)[1]
        fetched = _get_json(
            f"{stack.pds_url}/xrpc/com.atproto.repo.getRecord"
            f"?repo={alice.did}&collection=dev.atrun.test&rkey={rkey}"
        )
        assert fetched["value"]["text"] == "hello"
        client.request.close()

        listening = _listening_addresses(stack.pid)
        ports = {int(url.rsplit(":", 1)[1]) for url in (stack.pds_url, stack.plc_url)}
        assert {port for _, port in listening} == ports
        assert all(address in LOOPBACK for address, _ in listening), listening

        pid, data_dir = stack.pid, stack.data_dir
    assert not Path(f"/proc/{pid}").exists()
    assert data_dir is not None and not data_dir.exists()
