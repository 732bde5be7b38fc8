"""The runner's own reads refuse private addresses (atrund.atproto.addresses): a DID document
whose PDS URL points at loopback, the LAN or the metadata host, a name that resolves to loopback,
and a redirect to loopback are refused with a PrivateAddress that names the address, and nothing
reaches the private host; with ``[identity] allow_private_addresses = true`` the same reads go
through (the attack is real without the guard).

The hosts are real: ssrf_netns.py runs in a network namespace this test makes (only ``lo``, with
the test addresses on it), so no request can leave the machine.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from atrund import config
from atrund.atproto.addresses import refusal
from atrund.errors import PrivateAddress

HERE = Path(__file__).parent
ROOT = HERE.parent.parent


@pytest.mark.parametrize("address, why", [
    ("127.0.0.1", "loopback"), ("127.255.0.9", "loopback"), ("0.0.0.0", "this network"), ("10.1.2.3", "private"),
    ("172.16.0.1", "private"), ("192.168.1.1", "private"), ("100.64.0.1", "carrier-grade NAT"),
    ("169.254.169.254", "link-local"), ("224.0.0.1", "multicast"), ("240.0.0.1", "reserved"), ("255.255.255.255", "reserved"),
    ("::1", "loopback"), ("::", "unspecified"), ("fe80::1", "link-local"), ("fe80::1%lo", "link-local"),
    ("fd00::1", "unique-local"), ("fc00::1", "unique-local"), ("ff02::1", "multicast"),
    ("::ffff:127.0.0.1", "IPv4-mapped form of 127.0.0.1"), ("::ffff:169.254.169.254", "IPv4-mapped form of 169.254.169.254"),
    ("::10.0.0.1", "IPv4-compatible form of 10.0.0.1"), ("64:ff9b::a9fe:a9fe", "NAT64 form of 169.254.169.254"),
    ("64:ff9b::7f00:1", "NAT64 form of 127.0.0.1"), ("64:ff9b:1::1", "local-use NAT64"),
    ("2002:7f00:1::1", "6to4 form of 127.0.0.1"), ("2002:a9fe:a9fe::", "6to4 form of 169.254.169.254"),
    ("2001::1", "Teredo"),
])
def test_refused_ranges(address, why):
    """Every private, loopback, link-local, CGNAT, multicast and unique-local form is refused,
    IPv4 ones also in their IPv6 wrappings, with the reason named."""
    assert why in (refusal(address) or ""), refusal(address)


@pytest.mark.parametrize("address", ["1.1.1.1", "8.8.4.4", "2606:4700::1111", "2a00:1450::1", "::ffff:1.1.1.1",
                                     "64:ff9b::101:101", "2002:101:101::"])
def test_public_addresses_pass(address):
    assert refusal(address) is None


def test_allow_private_addresses_defaults_to_false():
    cfg = config.parse({"runner": {"pds": "https://pds.example", "identifier": "r.example"}})
    assert cfg.identity.allow_private_addresses is False
    assert PrivateAddress.exit_code == 29 and "allow_private_addresses" in PrivateAddress.fix


@pytest.fixture(scope="module")
def netns_answers(tmp_path_factory):
    if os.geteuid() != 0 or not shutil.which("unshare") or not shutil.which("ip"):
        pytest.skip("needs root, unshare and ip to make the test's own network namespace")
    hosts = tmp_path_factory.mktemp("netns") / "hosts"
    hosts.write_text("127.0.0.1 localhost\n1.2.3.4 plc.test pds.test hop.test\n127.0.0.1 rebind.test\n")
    setup = ("ip link set lo up && ip addr add 1.2.3.4/32 dev lo && ip addr add 10.9.9.9/32 dev lo"
             " && ip addr add 169.254.169.254/32 dev lo && mount --bind \"$0\" /etc/hosts"
             " && exec \"$1\" \"$2\" 8080")
    proc = subprocess.run(["unshare", "--net", "--mount", "sh", "-c", setup, str(hosts), sys.executable, str(HERE / "ssrf_netns.py")],
                          capture_output=True, text=True, timeout=120, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


@pytest.mark.parametrize("did, address", [
    ("did:plc:loopback", "127.0.0.1 is a loopback address"),
    ("did:plc:lan", "10.9.9.9 is a private address"),
    ("did:plc:metadata", "169.254.169.254 is a link-local address"),
    ("did:plc:mapped", "is the IPv4-mapped form of 169.254.169.254, a link-local address"),
    ("did:plc:rebind", "rebind.test resolves to 127.0.0.1, a loopback address"),
])
def test_a_did_document_naming_a_private_pds_is_refused(netns_answers, did, address):
    """The DID document (from a public PLC) names a PDS at a private address: the guarded read
    fails with PrivateAddress naming it, and reaches nothing; allowed, it reaches the host."""
    case = netns_answers[did]
    assert case["guarded"]["got"].startswith("PrivateAddress: com.atproto.repo.getRecord at "), case
    assert address in case["guarded"]["got"], case
    assert case["guarded"]["reached"] == [], case
    assert case["allowed"]["got"] == "ok" and case["allowed"]["reached"], case


def test_a_public_pds_is_read(netns_answers):
    case = netns_answers["did:plc:public"]
    assert case["guarded"] == {"got": "ok", "reached": ["1.2.3.4"]}, case


def test_a_redirect_to_loopback_is_refused(netns_answers):
    """The public PDS answers with a redirect to loopback: the redirect's connection is checked
    like the first, so only the public host is reached."""
    case = netns_answers["did:plc:hop"]
    assert "PrivateAddress" in case["guarded"]["got"] and "127.0.0.1 is a loopback address" in case["guarded"]["got"], case
    assert case["guarded"]["reached"] == ["1.2.3.4"], case
    assert case["allowed"] == {"got": "ok", "reached": ["1.2.3.4", "127.0.0.1"]}, case


def test_a_plc_directory_on_loopback_is_refused(netns_answers):
    case = netns_answers["loopback plc"]
    assert case["guarded"]["got"].startswith("PrivateAddress: cannot resolve did:plc:public: 127.0.0.1 is a loopback"), case
    assert case["allowed"]["got"] == "ok", case


def test_the_relay_socket_is_guarded(netns_answers):
    """The firehose's websocket connects through open_stream_socket: names and literals checked."""
    relay = netns_answers["relay"]
    assert relay["pds.test"] == "ok", relay
    assert "rebind.test resolves to 127.0.0.1, a loopback address" in relay["rebind.test"], relay
    assert "10.9.9.9 is a private address" in relay["10.9.9.9"], relay
