"""Sealed secrets: sealing and opening (pure), then through a real runner on the local PDS."""

import base64
import hashlib
import os
import stat

import pytest
from conftest import wait_result

from atrund.records import RUNNER
from atrund.sealed import KeyFileError, Keyring, RunnerKey, SecretError, generate_key_file, load_key_file, redact, seal

ALICE, BOB, RUNNER_DID = "did:plc:alice", "did:plc:bob", "did:plc:runner"
B1, B2 = "at://did:plc:alice/dev.atrun.bundle/3kaaaaaaaaaa2", "at://did:plc:alice/dev.atrun.bundle/3kaaaaaaaaaa3"


@pytest.fixture
def keyfile(tmp_path):
    path = tmp_path / "secrets.key"
    generate_key_file(path)
    return path


def sealed_to(path, name="API_KEY", value="sk-live-1234", author=ALICE, bundle=B1, runner=RUNNER_DID):
    ring = Keyring.load(path, [])
    return seal(name, value, ring.current, author=author, runner=runner, bundle_uri=bundle)


def open_with(path, items, old=(), author=ALICE, bundle=B1, runner=RUNNER_DID):
    return Keyring.load(path, list(old)).open(items, author=author, runner=runner, bundle_uri=bundle, where="invocation")


def test_round_trip_and_nothing_in_the_clear(keyfile):
    item = sealed_to(keyfile)
    assert set(item) == {"name", "keyId", "ciphertext"} and "sk-live-1234" not in str(item)
    assert open_with(keyfile, [item]) == {"API_KEY": "sk-live-1234"}
    assert sealed_to(keyfile)["ciphertext"] != item["ciphertext"]  # a fresh ephemeral key every time


@pytest.mark.parametrize("case, changes", [
    ("replayed into another author's record", {"author": BOB}),
    ("aimed at another bundle", {"bundle": B2}),
    ("opened by another runner's DID", {"runner": "did:plc:other"}),
])
def test_a_secret_opens_only_where_it_was_sealed_for(keyfile, case, changes):
    item = sealed_to(keyfile, value="canary-value-xyz")
    with pytest.raises(SecretError) as e:
        open_with(keyfile, [item], **changes)
    assert "secret 'API_KEY' in the invocation does not open" in str(e.value), case
    assert "canary-value-xyz" not in str(e.value)


def test_renamed_or_tampered_ciphertext_does_not_open(keyfile):
    item = sealed_to(keyfile)
    with pytest.raises(SecretError, match="'PATHX' in the invocation does not open"):
        open_with(keyfile, [{**item, "name": "PATHX"}])  # the name is bound too: no moving a value to another variable
    raw = bytearray(base64.b64decode(item["ciphertext"]))
    raw[-1] ^= 1
    with pytest.raises(SecretError, match="does not open"):
        open_with(keyfile, [{**item, "ciphertext": base64.b64encode(bytes(raw)).decode()}])
    with pytest.raises(SecretError, match="not base64"):
        open_with(keyfile, [{**item, "ciphertext": "%%%"}])
    with pytest.raises(SecretError, match="too short"):
        open_with(keyfile, [{**item, "ciphertext": base64.b64encode(b"x" * 10).decode()}])


def test_wrong_key_and_unknown_key_id(keyfile, tmp_path):
    other = tmp_path / "other.key"
    generate_key_file(other)
    mine = Keyring.load(keyfile, [])
    # Sealed to another key but claiming ours: the key id matches, the AEAD does not.
    forged = {**sealed_to(other), "keyId": mine.current.id}
    with pytest.raises(SecretError, match="does not open"):
        open_with(keyfile, [forged])
    with pytest.raises(SecretError) as e:
        open_with(keyfile, [sealed_to(other)])
    assert "which this runner does not hold" in str(e.value) and mine.current.id in str(e.value)


def test_rotation_old_keys_open_until_removed(keyfile, tmp_path):
    old_item = sealed_to(keyfile, value="old-secret")
    retired = tmp_path / "retired.key"
    keyfile.rename(retired)
    generate_key_file(keyfile)
    assert open_with(keyfile, [old_item], old=[retired]) == {"API_KEY": "old-secret"}
    assert open_with(keyfile, [sealed_to(keyfile, value="new")], old=[retired]) == {"API_KEY": "new"}
    with pytest.raises(SecretError, match="does not hold"):
        open_with(keyfile, [old_item])  # the old file no longer listed


def test_duplicate_and_bad_names(keyfile):
    item = sealed_to(keyfile)
    with pytest.raises(SecretError, match="appears twice"):
        open_with(keyfile, [item, item])
    with pytest.raises(SecretError, match="not an environment variable name"):
        sealed_to(keyfile, name="1BAD")


def test_key_file_is_private_and_never_silently_replaced(keyfile):
    assert stat.S_IMODE(keyfile.stat().st_mode) == 0o600
    before = keyfile.read_bytes()
    with pytest.raises(KeyFileError, match="already exists"):
        generate_key_file(keyfile)
    assert keyfile.read_bytes() == before
    generate_key_file(keyfile, force=True)
    assert keyfile.read_bytes() != before
    os.chmod(keyfile, 0o644)
    with pytest.raises(KeyFileError, match="accessible by other users"):
        load_key_file(keyfile)


def test_published_key_is_checked_before_sealing(keyfile):
    key = Keyring.load(keyfile, []).current
    record = {"secretsKey": key.to_record()}
    assert RunnerKey.from_record(record, RUNNER_DID).id == key.id
    with pytest.raises(SecretError, match="does not name its public key"):
        RunnerKey.from_record({"secretsKey": {**key.to_record(), "id": "x" * 16}}, RUNNER_DID)
    with pytest.raises(SecretError, match="publishes no secrets key"):
        RunnerKey.from_record({}, RUNNER_DID)


def test_redaction_reaches_nested_strings_and_keys():
    got = redact({"a": ["xx sk-123456 yy", {"sk-123456": 1}], "n": 5, "short": "abc"}, {"K": "sk-123456", "S": "abc"})
    assert got == {"a": ["xx [secret K] yy", {"[secret K]": 1}], "n": 5, "short": "abc"}


# -- through a real runner -----------------------------------------------------------------------

CANARY = "canary-7f3a9c1e5b"

SECRET_BUNDLE = '''
import hashlib, os, sys

def proof(args):
    return {"sha256": hashlib.sha256(os.environ["API_KEY"].encode()).hexdigest(), "names": sorted(os.environ)}

def echo(args):
    print("stdout: " + os.environ["API_KEY"])
    print("stderr: " + os.environ["API_KEY"], file=sys.stderr)
    return {"echo": os.environ["API_KEY"], os.environ["API_KEY"]: "as a key", "nested": [os.environ["API_KEY"]]}

def boom(args):
    raise RuntimeError("bad key " + os.environ["API_KEY"])

def crash(args):
    sys.stderr.write("dying with " + os.environ["API_KEY"] + "\\n")
    sys.stderr.flush()
    os._exit(3)

def handleRequest(request):
    return {"status": 200, "headers": {"x-key": os.environ["API_KEY"]}, "body": "key=" + os.environ["API_KEY"]}
'''


async def start_secret_runner(make_runner, tmp_path, *authors):
    key = tmp_path / "runner.key"
    generate_key_file(key)
    return await make_runner(access={"allowlist": [a.account.did for a in authors]}, secrets={"key_file": str(key)},
                             permissions={"env": ["API_KEY", "OTHER"]})


@pytest.fixture
async def secret_runner(make_runner, author, tmp_path):
    return await start_secret_runner(make_runner, tmp_path, author)


async def _runner_key(reader, runner_did):
    _, value = await reader.get_record(runner_did, RUNNER, "self")
    return RunnerKey.from_record(value, runner_did)


async def test_runner_publishes_its_key(secret_runner, reader):
    key = await _runner_key(reader, secret_runner.did)
    assert key.id == secret_runner.app.keyring.current.id


@pytest.fixture
def json_logs(tmp_path):
    """The runner's real log setup (JSON, debug level), written to a file the test reads."""
    import structlog

    from atrund import log

    path = tmp_path / "runner.log"
    with open(path, "w") as f:
        log.setup("debug", json_logs=True)
        structlog.configure(logger_factory=structlog.PrintLoggerFactory(file=f))
        yield path
        structlog.reset_defaults()


async def test_canary_never_leaves_the_bundle_through_the_runner(secret_runner, author, reader, json_logs):
    """Echoed, raised, printed and crashed with: the secret reaches the bundle (its hash proves
    it) but not the result records, the runner's logs, or its SQLite state."""
    key = await _runner_key(reader, secret_runner.did)
    bundle = await author.publish(SECRET_BUNDLE, permissions={"env": ["API_KEY"]})
    sealed = [seal("API_KEY", CANARY, key, author=author.account.did, runner=secret_runner.did, bundle_uri=bundle["uri"])]
    uris = {ep: await author.invoke(bundle, secret_runner.did, ep, secrets=sealed) for ep in ("proof", "echo", "boom", "crash", "handleRequest")}
    got = {ep: await wait_result(reader, secret_runner.did, uri) for ep, uri in uris.items()}
    assert got["proof"]["status"] == "success"
    assert got["proof"]["data"]["sha256"] == hashlib.sha256(CANARY.encode()).hexdigest()
    assert "API_KEY" in got["proof"]["data"]["names"]
    assert got["echo"]["data"] == {"echo": "[secret API_KEY]", "[secret API_KEY]": "as a key", "nested": ["[secret API_KEY]"]}
    assert got["boom"]["status"] == "error" and "RuntimeError: bad key [secret API_KEY]" in got["boom"]["error"]
    assert got["crash"]["status"] == "error" and "dying with [secret API_KEY]" in got["crash"]["error"]
    assert got["handleRequest"]["response"]["headers"]["x-key"] == "[secret API_KEY]"
    assert got["handleRequest"]["response"]["body"] == "key=[secret API_KEY]"
    await secret_runner.stop()
    logs = json_logs.read_text()
    assert logs.count('"event": "invocation"') == 5  # the log was captured, so its silence about the canary means something
    assert "RuntimeError: bad key [secret API_KEY]" in logs
    for where, text in {"results": repr(got), "logs": logs}.items():
        assert CANARY not in text, where
    for f in (secret_runner.cfg.state.dir).rglob("*"):
        if f.is_file():
            assert CANARY.encode() not in f.read_bytes(), f


async def test_invocation_secrets_win_over_the_bundle_s(secret_runner, author, reader):
    key = await _runner_key(reader, secret_runner.did)
    me, rd = author.account.did, secret_runner.did
    rkey = "3kbbbbbbbbbb2"
    uri = f"at://{me}/dev.atrun.bundle/{rkey}"
    bundle_secrets = [seal("API_KEY", "from-bundle", key, author=me, runner=rd, bundle_uri=uri),
                      seal("OTHER", "other-value", key, author=me, runner=rd, bundle_uri=uri)]
    blob = await author.session.upload_blob(SECRET_BUNDLE.encode(), "text/x-python")
    _, cid = await author.session.put_record("dev.atrun.bundle", rkey, {
        "runtime": "python", "code": blob, "createdAt": "2026-01-01T00:00:00.000Z",
        "permissions": {"env": ["API_KEY", "OTHER"]}, "secrets": bundle_secrets})
    bundle = {"uri": uri, "cid": cid}
    plain = await author.invoke(bundle, rd, "proof")
    override = await author.invoke(bundle, rd, "proof", secrets=[seal("API_KEY", "from-invocation", key, author=me, runner=rd, bundle_uri=uri)])
    a, b = await wait_result(reader, rd, plain), await wait_result(reader, rd, override)
    assert a["data"]["sha256"] == hashlib.sha256(b"from-bundle").hexdigest() and a["data"]["names"] == ["API_KEY", "OTHER"]
    assert b["data"]["sha256"] == hashlib.sha256(b"from-invocation").hexdigest()


async def test_replayed_and_misaimed_secrets_end_in_an_explained_error(make_runner, tmp_path, author, login_author, reader):
    bob = await login_author("bob")
    secret_runner = await start_secret_runner(make_runner, tmp_path, author, bob)
    key = await _runner_key(reader, secret_runner.did)
    rd = secret_runner.did
    b1 = await author.publish(SECRET_BUNDLE, permissions={"env": ["API_KEY"]})
    b2 = await author.publish(SECRET_BUNDLE, permissions={"env": ["API_KEY"]})
    alices = seal("API_KEY", CANARY, key, author=author.account.did, runner=rd, bundle_uri=b1["uri"])
    cases = {
        # Bob copies Alice's sealed secret from her public invocation into his own.
        "replayed": await bob.invoke(b1, rd, "proof", secrets=[alices]),
        "other bundle": await author.invoke(b2, rd, "proof", secrets=[alices]),
        "not in permissions.env": await author.invoke(
            b1, rd, "proof", secrets=[seal("OTHER", "x" * 8, key, author=author.account.did, runner=rd, bundle_uri=b1["uri"])]),
    }
    got = {name: await wait_result(reader, rd, uri) for name, uri in cases.items()}
    for name in ("replayed", "other bundle"):
        assert got[name]["status"] == "error", name
        assert got[name]["error"].startswith("secret 'API_KEY' in the invocation does not open"), got[name]["error"]
    assert "'OTHER' in the invocation is not a name the bundle's permissions.env lists (API_KEY)" in got["not in permissions.env"]["error"]
    assert CANARY not in repr(got)


async def test_a_runner_without_a_key_says_so(make_runner, author, reader, tmp_path):
    runner = await make_runner(access={"allowlist": [author.account.did]}, permissions={"env": ["API_KEY"]})
    _, value = await reader.get_record(runner.did, RUNNER, "self")
    assert "secretsKey" not in value
    other = tmp_path / "k"
    generate_key_file(other)
    bundle = await author.publish(SECRET_BUNDLE, permissions={"env": ["API_KEY"]})
    uri = await author.invoke(bundle, runner.did, "proof", secrets=[sealed_to(other, author=author.account.did, bundle=bundle["uri"], runner=runner.did)])
    got = await wait_result(reader, runner.did, uri)
    assert got["status"] == "error" and "this runner has no secrets key" in got["error"]


# -- the command line ----------------------------------------------------------------------------

PROOF = '''
import hashlib, os

def proof(args):
    return {"sha256": hashlib.sha256(os.environ.get("API_KEY", "").encode()).hexdigest()}
'''


async def test_cli_keys_init_publish_invoke_and_seal(stack, new_account, make_runner, tmp_path):
    """keys init → the runner publishes the key; publish --secret and invoke --secret seal to it."""
    import asyncio
    import json

    from conftest import _author_env, atrund

    cfg = tmp_path / "runner.toml"
    cfg.write_text('[runner]\npds = "http://x"\nidentifier = "r.test"\n[secrets]\nkey_file = "keys/runner.key"\n')
    made = atrund("keys", "init", "-c", str(cfg))
    assert made.returncode == 0, made.stderr
    key = json.loads(made.stdout)
    path = tmp_path / "keys/runner.key"
    assert key["keyFile"] == str(path) and stat.S_IMODE(path.stat().st_mode) == 0o600
    again = atrund("keys", "init", "-c", str(cfg))
    assert again.returncode == KeyFileError.exit_code and "already exists" in again.stderr

    alice = new_account("cli")
    runner = await make_runner(access={"allowlist": [alice.did]}, secrets={"key_file": str(path)}, permissions={"env": ["API_KEY"]})
    assert runner.app.keyring.current.id == key["id"]
    env = {**_author_env(stack, alice), "MY_KEY": "from-my-environment"}
    src = tmp_path / "proof.py"
    src.write_text(PROOF)
    pub = atrund("bundle", "publish", str(src), "--runtime", "python", "--secret", "API_KEY=from-bundle-record",
                 "--runner", runner.did, env=env)
    assert pub.returncode == 0, pub.stderr
    bundle = json.loads(pub.stdout)
    no_runner = atrund("bundle", "publish", str(src), "--runtime", "python", "--secret", "API_KEY=x", env=env)
    assert no_runner.returncode == 2 and "--secret needs --runner" in no_runner.stderr

    async def invoke(*extra):
        p = await asyncio.to_thread(atrund, "invoke", bundle["uri"], "--runner", runner.did, "--endpoint", "proof",
                                    "--wait", "--wait-seconds", "60", *extra, env=env)
        assert p.returncode == 0, p.stdout + p.stderr
        return json.loads(p.stdout)

    sha = lambda v: hashlib.sha256(v.encode()).hexdigest()  # noqa: E731
    assert (await invoke())["value"]["sha256"] == sha("from-bundle-record")
    out = await invoke("--secret", "API_KEY=from-the-invocation")
    assert out["value"]["sha256"] == sha("from-the-invocation")
    assert "from-the-invocation" not in json.dumps(out)

    sealed = atrund("secret", "seal", "--runner", runner.did, "--bundle", bundle["uri"], "API_KEY=abc123", "MY_KEY", env=env)
    assert sealed.returncode == 0, sealed.stderr
    items = json.loads(sealed.stdout)
    assert [i["name"] for i in items] == ["API_KEY", "MY_KEY"] and "abc123" not in sealed.stdout
    opened = runner.app.keyring.open(items, author=alice.did, runner=runner.did, bundle_uri=bundle["uri"], where="test")
    assert opened == {"API_KEY": "abc123", "MY_KEY": "from-my-environment"}
    bad = atrund("secret", "seal", "--runner", runner.did, "--bundle", bundle["uri"], "NOT_SET_ANYWHERE", env=env)
    assert bad.returncode == 2 and "no environment variable NOT_SET_ANYWHERE" in bad.stderr


def test_records_carrying_secrets_pass_the_official_validator(keyfile):
    """Optional fields, added compatibly: the official @atproto/lexicon validator accepts them."""
    from test_lexicons_official import BLOB_CID, BUNDLE, validate

    from atrund.records import Runner, SecretsKey, now_iso

    key = Keyring.load(keyfile, []).current
    item = sealed_to(keyfile, value="v" * 8192)  # the largest value still fits the lexicon
    runner = Runner(runtimes=["python"], isolation="process", access_mode="follows", access_source=ALICE,
                    secrets_key=SecretsKey.model_validate(key.to_record()), created_at=now_iso())
    records = [
        ("dev.atrun.runner", runner.to_record()),
        ("dev.atrun.invocation", {"runner": RUNNER_DID, "bundle": BUNDLE.to_record(), "endpoint": "main", "secrets": [item],
                                  "createdAt": now_iso()}),
        ("dev.atrun.bundle", {"runtime": "python", "createdAt": now_iso(), "permissions": {"env": ["API_KEY"]}, "secrets": [item],
                              "code": {"$type": "blob", "ref": {"$link": BLOB_CID}, "mimeType": "text/x-python", "size": 10}}),
    ]
    assert validate(records) == [{"ok": True}] * 3
    bad = [("dev.atrun.invocation", {"runner": RUNNER_DID, "bundle": BUNDLE.to_record(), "endpoint": "main",
                                     "secrets": [{"name": "K", "keyId": "x"}], "createdAt": now_iso()})]  # no ciphertext
    assert [r["ok"] for r in validate(bad)] == [False]


def test_key_file_configuration(tmp_path):
    """No default key: secrets refused, not an error. A named key file that is missing: an error naming it."""
    from atrund import config
    from atrund.app import load_keyring

    base = {"runner": {"pds": "http://x", "identifier": "r.test"}, "state": {"dir": str(tmp_path / "st")}}
    assert load_keyring(config.parse(base)) is None
    with pytest.raises(KeyFileError, match="old_key_files is set but there is no current key"):
        load_keyring(config.parse({**base, "secrets": {"old_key_files": [str(tmp_path / "old")]}}))
    with pytest.raises(KeyFileError, match=f"{tmp_path / 'nope.key'}: cannot read"):
        load_keyring(config.parse({**base, "secrets": {"key_file": str(tmp_path / "nope.key")}}))
    generate_key_file(tmp_path / "st" / "secrets.key")  # the default place
    assert load_keyring(config.parse(base)) is not None


@pytest.mark.parametrize("runtime, source", [
    # Deno refuses (NotCapable) to read a variable it was not granted, so only the granted one is asked for.
    ("deno", 'export function main(args) { return {key: Deno.env.get("API_KEY"), other: null}; }\n'),
    ("node", 'export function main(args) { return {key: process.env.API_KEY, other: process.env.HOME ?? null}; }\n'),
])
async def test_every_runtime_gets_the_opened_secret_and_nothing_else(secret_runner, author, reader, runtime, source):
    key = await _runner_key(reader, secret_runner.did)
    bundle = await author.publish(source, runtime=runtime, permissions={"env": ["API_KEY"]})
    sealed = [seal("API_KEY", "abc", key, author=author.account.did, runner=secret_runner.did, bundle_uri=bundle["uri"])]
    got = await wait_result(reader, secret_runner.did, await author.invoke(bundle, secret_runner.did, secrets=sealed), timeout=60)
    assert got["status"] == "success", got
    assert got["data"] == {"key": "abc", "other": None}  # 3 characters: below the redaction threshold, so visible


async def test_rotation_through_restarts(make_runner, new_account, author, reader, tmp_path):
    """Rotate: the new key is published, the old one (in old_key_files) still opens; once removed, it does not."""
    account = new_account("runner")
    old, new = tmp_path / "old.key", tmp_path / "new.key"
    generate_key_file(old)
    generate_key_file(new)
    common = {"access": {"allowlist": [author.account.did]}, "permissions": {"env": ["API_KEY"]}}
    first = await make_runner(account, "first", secrets={"key_file": str(old)}, **common)
    bundle = await author.publish(SECRET_BUNDLE, permissions={"env": ["API_KEY"]})
    key = await _runner_key(reader, first.did)
    sealed_to_old = [seal("API_KEY", "rotate-me", key, author=author.account.did, runner=first.did, bundle_uri=bundle["uri"])]
    await first.stop()
    # Each restart below uses a fresh state directory for the same account (so it re-reads the
    # author's repo from the start); only the newest invocation's result is looked at.

    rotated = await make_runner(account, "rotated", secrets={"key_file": str(new), "old_key_files": [str(old)]}, **common)
    assert (await _runner_key(reader, rotated.did)).id == Keyring.load(new, []).current.id  # the new key is published
    got = await wait_result(reader, rotated.did, await author.invoke(bundle, rotated.did, "proof", secrets=sealed_to_old))
    assert got["status"] == "success" and got["data"]["sha256"] == hashlib.sha256(b"rotate-me").hexdigest()
    await rotated.stop()

    removed = await make_runner(account, "removed", secrets={"key_file": str(new)}, **common)
    got = await wait_result(reader, removed.did, await author.invoke(bundle, removed.did, "proof", secrets=sealed_to_old))
    assert got["status"] == "error" and "which this runner does not hold" in got["error"]
