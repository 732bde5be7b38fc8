"""AT-native trust (follows, list membership) and live access edits, against the real local PDS."""

import asyncio
import json
import os

import pytest
from conftest import no_result, wait_result

from atrund.access import AccessPolicy, PolicyFile, PolicyFileError, effective
from atrund.atproto.session import Session
from atrund.config import AccessSection
from atrund.errors import IdentityError
from atrund.records import RUNNER, now_iso

HELLO = "def main(args):\n    return {'ok': True}\n"
FOLLOW, LIST, LISTITEM = "app.bsky.graph.follow", "app.bsky.graph.list", "app.bsky.graph.listitem"


def test_policy_modes_with_a_trusted_set():
    p = AccessPolicy("follows", frozenset({"did:plc:a"}), frozenset({"did:plc:x"}), frozenset({"did:plc:f", "did:plc:x"}))
    assert p.allows("did:plc:a") and p.allows("did:plc:f")
    assert not p.allows("did:plc:x")  # followed, but blocked: the block wins
    assert not p.allows("did:plc:stranger")
    assert p.served() == ["did:plc:a", "did:plc:f"]
    assert AccessPolicy("open", frozenset(), frozenset()).served() == []


def test_policy_file_edits_are_atomic_and_validated(tmp_path):
    f = PolicyFile(tmp_path / "access.json")
    assert f.read().allow == frozenset() and f.stamp() is None
    f.allow("did:plc:a")
    f.deny("did:plc:b")
    assert json.loads(f.path.read_text()) == {"allow": ["did:plc:a"], "deny": ["did:plc:b"]}
    entries = f.deny("did:plc:a")  # deny takes it off the allow list
    assert entries.allow == frozenset() and entries.deny == {"did:plc:a", "did:plc:b"}
    assert f.allow("did:plc:b").deny == {"did:plc:a"}
    section = AccessSection(mode="allowlist", allowlist=["did:plc:c"], blocklist=["did:plc:b"])
    pol = effective(section, f.read())
    assert not pol.allows("did:plc:b")  # the configuration's block still wins
    assert pol.allows("did:plc:c") and not pol.allows("did:plc:a")
    f.path.write_text('{"allow": ["alice.test"]}')
    with pytest.raises(PolicyFileError, match="'alice.test' is not a DID"):
        f.read()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".access.json.")] == []  # no temporary left behind


@pytest.mark.skipif(os.geteuid() != 0, reason="an edit as root is the point")
def test_an_operators_edit_as_root_leaves_the_file_to_a_runner_running_as_its_own_user(tmp_path):
    """`atrund access allow` run as root while the runner runs as `[runner] user` (which owns its
    state directory): the new file is the directory owner's, so the runner can still read it.
    Before: root's 0600 file, which the runner then could not read."""
    state = tmp_path / "state"
    state.mkdir()
    os.chown(state, 64_731, 64_731)
    f = PolicyFile(state / "access.json")
    f.allow("did:plc:a")
    assert (f.path.stat().st_uid, f.path.stat().st_gid) == (64_731, 64_731)


@pytest.mark.parametrize("access, message", [
    ({"mode": "list"}, 'access: list_uri: required when mode = "list"'),
    ({"mode": "list", "list_uri": "at://did:plc:a/app.bsky.feed.post/3k"}, "access: list_uri: 'at://did:plc:a/app.bsky.feed.post/3k' is not"),
    ({"mode": "follows", "operator": "alice"}, "access: operator: 'alice' is not a DID or a handle"),
    ({"mode": "follows", "refresh_interval": 0}, "access.refresh_interval: Input should be greater than or equal to 1"),
    ({"mode": "friends"}, "access.mode: Input should be 'allowlist', 'blocklist', 'open', 'follows' or 'list'"),
])
def test_trust_configuration_errors_name_the_key(access, message):
    from atrund import config

    with pytest.raises(config.ConfigError) as e:
        config.parse({"runner": {"pds": "http://x", "identifier": "r.test"}, "access": access})
    assert str(e.value).startswith(message), str(e.value)


async def _login(account) -> Session:
    return await Session.login(account.pds_url, account.handle, account.app_password)


async def _until(predicate, timeout: float = 15.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not predicate():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.1)


async def test_follows_mode_serves_whom_the_runner_follows_until_unfollowed(author, new_account, make_runner, reader):
    runner_account = new_account("runner")
    me = await _login(runner_account)
    try:
        follow_uri, _ = await me.create_record(FOLLOW, {"subject": author.account.did, "createdAt": now_iso()})
        runner = await make_runner(runner_account, access={"mode": "follows", "refresh_interval": 1})
        _, declared = await reader.get_record(runner.did, RUNNER, "self")
        assert declared["accessMode"] == "follows" and declared["accessSource"] == runner.did
        bundle = await author.publish(HELLO)
        served = await author.invoke(bundle, runner.did)
        assert (await wait_result(reader, runner.did, served))["status"] == "success"

        await me.delete_record(FOLLOW, follow_uri.rsplit("/", 1)[1])
        await _until(lambda: not runner.app.policy.allows(author.account.did))
        assert author.account.did not in runner.app.poller.authors
        dropped = await author.invoke(bundle, runner.did)
        assert await no_result(reader, runner.did, dropped)
    finally:
        await me.close()


async def test_follows_of_a_named_operator_and_blocks_win(author, login_author, new_account, make_runner, reader):
    operator = new_account("operator")
    blocked = await login_author("blocked")
    op = await _login(operator)
    try:
        for who in (author, blocked):
            await op.create_record(FOLLOW, {"subject": who.account.did, "createdAt": now_iso()})
        runner = await make_runner(access={"mode": "follows", "operator": operator.did, "blocklist": [blocked.account.did]})
        assert runner.app.policy.source == operator.did
        ok = await author.invoke(await author.publish(HELLO), runner.did)
        assert (await wait_result(reader, runner.did, ok))["status"] == "success"
        assert not runner.app.policy.allows(blocked.account.did)
        assert blocked.account.did not in runner.app.poller.authors
    finally:
        await op.close()


async def test_list_mode_serves_members_until_removed(stack, author, login_author, new_account, make_runner, reader, tmp_path):
    from conftest import atrund

    owner = new_account("curator")
    other = await login_author("other")
    s = await _login(owner)
    try:
        list_uri, _ = await s.create_record(LIST, {"purpose": "app.bsky.graph.defs#curatelist", "name": "runners", "createdAt": now_iso()})
        decoy, _ = await s.create_record(LIST, {"purpose": "app.bsky.graph.defs#curatelist", "name": "decoy", "createdAt": now_iso()})
        item, _ = await s.create_record(LISTITEM, {"subject": author.account.did, "list": list_uri, "createdAt": now_iso()})
        await s.create_record(LISTITEM, {"subject": other.account.did, "list": decoy, "createdAt": now_iso()})  # another list
        runner = await make_runner(access={"mode": "list", "list_uri": list_uri, "refresh_interval": 1})
        _, declared = await reader.get_record(runner.did, RUNNER, "self")
        assert declared["accessMode"] == "list" and declared["accessSource"] == list_uri
        assert runner.app.policy.served() == [author.account.did]
        bundle = await author.publish(HELLO)
        ok = await author.invoke(bundle, runner.did)
        assert (await wait_result(reader, runner.did, ok))["status"] == "success"

        cfg = tmp_path / "runner.toml"
        cfg.write_text(f'[runner]\npds = "{stack.pds_url}"\nidentifier = "{runner.account.handle}"\n'
                       f'{stack.identity_toml()}[access]\nmode = "list"\nlist_uri = "{list_uri}"\n'
                       f'[state]\ndir = "{runner.cfg.state.dir}"\n')
        listed = await asyncio.to_thread(atrund, "access", "list", "--members", "-c", str(cfg))
        assert listed.returncode == 0, listed.stderr
        assert json.loads(listed.stdout)["trusted"] == {"of": list_uri, "refreshSeconds": 300.0, "members": [author.account.did]}

        await s.delete_record(LISTITEM, item.rsplit("/", 1)[1])
        await _until(lambda: not runner.app.policy.allows(author.account.did))
        gone = await author.invoke(bundle, runner.did)
        assert await no_result(reader, runner.did, gone)
    finally:
        await s.close()


async def test_access_allow_and_deny_reach_a_running_daemon(stack, author, make_runner, reader, tmp_path):
    """The CLI edits the policy file; the daemon serving in this loop picks it up without a restart."""
    from conftest import atrund

    runner = await make_runner(access={"allowlist": []})
    cfg = tmp_path / "runner.toml"
    cfg.write_text(f'[runner]\npds = "{stack.pds_url}"\nidentifier = "{runner.account.handle}"\n'
                   f'[state]\ndir = "{runner.cfg.state.dir}"\n')
    bundle = await author.publish(HELLO)
    before = await author.invoke(bundle, runner.did)
    assert await no_result(reader, runner.did, before, settle=1.0)

    p = await asyncio.to_thread(atrund, "access", "allow", author.account.handle, "-c", str(cfg))  # a handle, resolved
    assert p.returncode == 0, p.stderr
    assert author.account.did in p.stderr
    await _until(lambda: runner.app.policy.allows(author.account.did), timeout=5)
    served = await author.invoke(bundle, runner.did)
    assert (await wait_result(reader, runner.did, served))["status"] == "success"

    listed = json.loads((await asyncio.to_thread(atrund, "access", "list", "-c", str(cfg))).stdout)
    assert listed["mode"] == "allowlist" and listed["allow"] == [{"did": author.account.did, "from": "policy file"}]

    p = await asyncio.to_thread(atrund, "access", "deny", author.account.did, "-c", str(cfg))
    assert p.returncode == 0, p.stderr
    await _until(lambda: not runner.app.policy.allows(author.account.did), timeout=5)
    after = await author.invoke(bundle, runner.did)
    assert await no_result(reader, runner.did, after)

    bad = await asyncio.to_thread(atrund, "access", "allow", "nobody-at-all.test", "-c", str(cfg))
    assert bad.returncode == IdentityError.exit_code and "cannot resolve handle nobody-at-all.test" in bad.stderr


async def test_a_broken_policy_file_keeps_the_last_good_policy(author, make_runner):
    runner = await make_runner(access={"allowlist": []})
    f = runner.app.policy.file
    f.allow(author.account.did)
    await _until(lambda: runner.app.policy.allows(author.account.did), timeout=5)
    f.path.write_text("{not json")
    await asyncio.sleep(1.5)
    assert runner.app.policy.allows(author.account.did)


async def test_an_unreadable_trust_source_keeps_the_last_known_set(author, new_account, make_runner):
    """A PDS outage must neither lock everyone out nor end the runner: the last set stays in force."""
    from atrund.trust import TrustUnavailable

    operator = new_account("operator")
    op = await _login(operator)
    try:
        await op.create_record(FOLLOW, {"subject": author.account.did, "createdAt": now_iso()})
        runner = await make_runner(access={"mode": "follows", "operator": operator.did})
        live = runner.app.policy
        assert live.allows(author.account.did)
        live.source = "did:plc:nobodyhomexxxxxxxxxxxxx"  # resolves nowhere: every read fails
        with pytest.raises(TrustUnavailable, match="did:plc:nobodyhomexxxxxxxxxxxxx"):
            await live.refresh_trust()
        assert live.allows(author.account.did) and live.trusted == {author.account.did}
    finally:
        await op.close()


async def test_a_runner_whose_operator_does_not_resolve_still_starts(make_runner):
    runner = await make_runner(access={"mode": "follows", "operator": "did:plc:nobodyhomexxxxxxxxxxxxx"})
    assert runner.app.policy.trusted == frozenset() and runner.app.poller.authors == []
