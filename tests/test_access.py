"""Access (who) and permission grants (what), as pure policy."""

import pytest

from atrund.access import AccessPolicy, PermissionPolicy
from atrund.records import Permissions


def test_block_always_wins():
    for mode in ("allowlist", "blocklist", "open"):
        p = AccessPolicy(mode, frozenset({"did:plc:x"}), frozenset({"did:plc:x"}))
        assert not p.allows("did:plc:x")


def test_modes():
    assert not AccessPolicy("allowlist", frozenset(), frozenset()).allows("did:plc:a")
    assert AccessPolicy("blocklist", frozenset(), frozenset({"did:plc:b"})).allows("did:plc:a")
    assert AccessPolicy("open", frozenset(), frozenset()).allows("did:plc:a")


@pytest.mark.parametrize("asked, allowed, refused", [
    (["api.example.com"], ["*.example.com"], []),
    (["example.com"], ["*.example.com"], []),
    (["evil.com"], ["*.example.com"], ["net evil.com"]),
    (["notexample.com"], ["*.example.com"], ["net notexample.com"]),
    (["api.example.com:8443"], ["api.example.com"], []),
    (["api.example.com:8443"], ["api.example.com:443"], ["net api.example.com:8443"]),
    (["anything"], ["*"], []),
])
def test_net_grants(asked, allowed, refused):
    assert PermissionPolicy(net=tuple(allowed)).refused(Permissions(net=asked)) == refused


def test_path_grants_do_not_escape_with_dotdot():
    p = PermissionPolicy(read=("/srv/data",), write=("/srv/out",))
    assert p.refused(Permissions(read=["/srv/data/a", "/srv/data"], write=["/srv/out/x"])) == []
    assert p.refused(Permissions(read=["/srv/data/../secret", "relative"], write=["/srv/outside"])) == [
        "read /srv/data/../secret", "read relative", "write /srv/outside"]


def test_nothing_is_granted_by_default():
    assert PermissionPolicy().refused(Permissions(net=["a.com"], env=["KEY"])) == ["net a.com", "env KEY"]
    assert PermissionPolicy().refused(None) == []


def test_a_symlink_inside_a_granted_directory_does_not_widen_the_grant(tmp_path):
    """A bundle with write access can plant a link; the policy judges where it really leads."""
    root = tmp_path / "granted"
    root.mkdir()
    (root / "escape").symlink_to("/etc")
    p = PermissionPolicy(read=(str(root),))
    assert p.refused(Permissions(read=[str(root / "escape")])) == [f"read {root / 'escape'}"]
    assert p.refused(Permissions(read=[str(root / "plain")])) == []


@pytest.mark.parametrize("net, ports", [
    (["api.example.com"], [80, 443]), (["api.example.com:8443"], [8443]), (["[2001:db8::1]:8443"], [8443]),
    (["2001:db8::1"], [80, 443]), (["127.0.0.1:5432", "x.org"], [80, 443, 5432]),
])
def test_network_grants_become_landlock_ports(net, ports):
    from atrund.execute.process.backend import ports_for

    assert ports_for(net) == ports
