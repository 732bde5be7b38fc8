"""Every failure atrund expects, in one tree: what it means, the exit code the CLI ends with, and
the fix it names.

    AtrundError                          10  (never raised itself)
    ├── ConfigError                      11  the configuration is unusable; names the TOML key
    ├── PolicyFileError                  12  the access policy file cannot be read or written
    ├── KeyFileError                     13  the runner's secrets key file is missing, unreadable or too open
    ├── StateLocked                      14  another atrund process uses this state directory
    ├── StoreError                       15  the state store failed (disk full, read-only, I/O error)
    │   └── StateConflict                55  a run's bundle-state lock was taken from it: its writes are not kept
    ├── QuarantineError                  16  the quarantine file cannot be read or written
    ├── RemoteError                      20  a server answered with an error or not at all
    │   ├── NotFound                     21  the record or blob does not exist
    │   │   └── NotARunner               22  the DID publishes no dev.atrun.runner record
    │   ├── Unreachable                  23  network failure or 5xx: worth retrying
    │   ├── ContentMismatch              24  bytes that do not hash to the CID they were fetched by
    │   ├── TooLarge                     25  more bytes than the configured limit
    │   ├── Rejected                     26  the PDS refused a write (4xx): the same write fails again
    │   ├── LoginFailed                  27  the PDS refused the identifier and password
    │   ├── CallFailed                   28  a runner's gateway answered an XRPC call with an error
    │   └── PrivateAddress               29  a private address the runner does not connect to
    ├── IdentityError                    30  a DID or handle does not resolve, or names no PDS
    ├── InvalidUrl                       31  a URL without http:// or https://
    ├── Malformed                        32  input that breaks a documented limit or is not the shape it claims
    ├── ProofError                       33  a firehose frame does not prove what it claims
    ├── Incomplete                       34  a firehose frame lacks a block the proof needs
    ├── ServiceAuthError                 35  a service-auth token is missing or not acceptable
    ├── TrustUnavailable                 36  the follows or the list could not be read
    ├── RunnerMismatch                   37  the runner does not run the bundle's runtime (checked before invoking)
    ├── CheckFailed                      38  `bundle publish` found the file unfit for its runtime
    ├── NoSession                        39  no login given and none kept by `atrund login`
    ├── NotServed                        40  the access policy does not serve this DID (checked before resolving it)
    ├── BundleRefused                    41  the bundle cannot be run as pinned (CID mismatch, too large)
    │   ├── VersionGone                  42  the pinned CID is no longer in the repo, nor cached here
    │   ├── EndpointUndeclared           43  the endpoint is not one the bundle record declares
    │   └── PermissionsRefused           44  the bundle asks for permissions this runner does not grant
    ├── SecretError                      45  a sealed secret cannot be used (names the secret, never its value)
    ├── UnstorableValue                  46  a value no record can hold, not even as a jsonValue
    ├── InvalidInvocation                47  an invocation record that does not match the lexicon (or nests too deep)
    ├── BundleUnavailable                48  the pinned bundle could not be fetched (``__cause__`` says why)
    ├── InvalidSchedule                  49  a schedule record that does not match the lexicon, or a timetable this runner refuses
    ├── ExecutorError                    50  the executor itself failed (no backend, no worker, engine gone)
    │   └── UnknownRuntime               51  no runtime directory of that name
    ├── ImageError                       52  the runtime image or the microVM guest could not be built
    ├── LocalStackError                  53  the local PDS and PLC (atrund.dev.stack) could not be started
    ├── UnknownBackend                   54  an isolation name that is no backend, alias or auto (also a ValueError)
    ├── DropFailed                       56  `atrund serve` could not become runner.user (no such user, or the drop failed)
    ├── CopyRefused                      57  `atrund state copy` refused: the target database already holds state
    ├── StateMoved                       58  this SQLite state was copied into Postgres: it is not opened again
    └── HelperGone                       59  under runner.user, the privileged helper died: serve stops to be restarted

Exit codes 0-4 mean something else (see the README): 0 done, 1 an unexpected error (a bug: it
prints a traceback), 2 a usage error (click), 3 a bundle's status is not success, 4 no result in
time. ``describe`` is how the CLI prints one of these: one line, the message and the fix.

The modules that raise these import them from here (and re-export the names they always had:
``atrund.config.ConfigError``, ``atrund.execute.ExecutorError``, ...). atrund.gateway maps them
to HTTP statuses, in one function. Third-party exceptions (aiohttp, the atproto SDK, docker) are
translated into these where they are raised: atrund.atproto.repos for reads, atrund.atproto.session
for writes, atrund.atproto.identity for DID resolution, the backends for their engines.
"""

from __future__ import annotations


class AtrundError(Exception):
    """The root: never raised itself. Each subclass states its exit code and, when its messages
    do not say it themselves, the fix: ``class NotFound(RemoteError, code=21, fix=...)``."""

    exit_code = 10
    fix = ""

    def __init_subclass__(cls, *, code: int, fix: str | None = None, **kwargs) -> None:
        super().__init_subclass__(**kwargs)
        cls.exit_code = code
        if fix is not None:  # else the parent's
            cls.fix = fix


class ConfigError(AtrundError, code=11, fix="fix that key in the configuration file; config.toml.example lists every key"):
    """The configuration is unusable; the message names the key."""


class PolicyFileError(AtrundError, code=12, fix="repair or remove that file (`atrund access allow|deny` rewrites it)"):
    """The access policy file cannot be read or written; the message names the file."""


class KeyFileError(AtrundError, code=13):
    """The runner's key file is missing, unreadable, too open or not an X25519 key."""


class StateLocked(AtrundError, code=14, fix="stop the other runner, or give this one its own state.dir (or state.url database)"):
    """Another atrund process holds this state directory's lock."""


class StoreError(AtrundError, code=15, fix="check the disk and the permissions of state.dir, or the database state.url names"):
    """The state store failed (disk full, read-only or immutable file, I/O error): worth retrying."""


class StateConflict(StoreError, code=55, fix="run it again; nothing it wrote to its bundle's state was kept"):
    """A run lost its bundle-state namespace lock before it committed (its replica was presumed
    dead, or it held the lock past its bound): another run may have changed the namespace, so
    this run's writes are refused. Not worth retrying as it is (atrund.kv)."""


class QuarantineError(AtrundError, code=16, fix="check the file and the permissions of state.dir"):
    """The quarantine file cannot be read or written."""


class RemoteError(AtrundError, code=20):
    """A server answered with an error, or not at all."""


class NotFound(RemoteError, code=21, fix="check the AT URI or DID"):
    """The record or blob does not exist."""


class NotARunner(NotFound, code=22, fix="check the --runner DID; a runner publishes its record when it starts"):
    """The DID has no dev.atrun.runner record, so it has no key to seal to and no gateway."""


class Unreachable(RemoteError, code=23, fix="check the URL, and that the server is up and reachable from here"):
    """A network failure or a 5xx: worth retrying."""


class ContentMismatch(RemoteError, code=24):
    """Bytes that do not hash to the CID they were fetched by."""


class TooLarge(RemoteError, code=25):
    """More bytes than the configured limit."""


class Rejected(RemoteError, code=26):
    """The PDS answered 4xx: the same request will fail again."""


class LoginFailed(RemoteError, code=27,
                  fix="check --identifier and --password (an app password), or ATRUND_IDENTIFIER and ATRUND_PASSWORD"):
    """The PDS refused the identifier and password."""


class CallFailed(RemoteError, code=28):
    """A runner's gateway answered an XRPC call with an error (the message has its status and why)."""


class PrivateAddress(RemoteError, code=29,
                     fix="if this runner is meant to reach private addresses (a local stack), set [identity] "
                         "allow_private_addresses = true"):
    """A DID document, a redirect or a configured URL leads the runner to a loopback, private or
    link-local address, which it does not connect to (atrund.atproto.addresses). Not retried."""


class IdentityError(AtrundError, code=30,
                    fix="check the handle or DID, and that the PLC directory or PDS that resolves it answers"):
    """A DID or handle does not resolve, or its document names no PDS."""


class InvalidUrl(AtrundError, code=31):
    """A URL without http:// or https:// (a PDS given as host:port); the message suggests one."""


class Malformed(AtrundError, code=32):
    """Input that breaks a documented limit or is not the shape it claims; the message names
    where and which limit."""


class ProofError(AtrundError, code=33):
    """The frame does not prove what it claims (forged, tampered or malformed): never run it."""


class Incomplete(AtrundError, code=34):
    """The frame lacks a block needed for the proof; ask the author's PDS instead."""


class ServiceAuthError(AtrundError, code=35):
    """The token is missing or not acceptable; ``reason`` is a short label for metrics."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


class TrustUnavailable(AtrundError, code=36, fix="check access.operator or access.list_uri, and that its PDS answers"):
    """The operator's follows or the access list could not be read."""


class RunnerMismatch(AtrundError, code=37,
                     fix="invoke it on a runner whose dev.atrun.runner record lists that runtime"):
    """The runner's record does not list the bundle's runtime: an invocation would only be refused."""


class CheckFailed(AtrundError, code=38, fix="fix the file, or publish it unchecked with --no-check"):
    """`bundle publish` found the file unfit for its runtime: another runtime's extension, a syntax
    error (by the runtime's own checker), or a declared endpoint the file does not define."""


class NoSession(AtrundError, code=39,
                fix="run `atrund login`, or give --identifier and --password (or ATRUND_IDENTIFIER and ATRUND_PASSWORD)"):
    """A command that writes as the author has neither a password nor a session kept by `atrund login`."""


class NotServed(AtrundError, code=40):
    """The access policy does not serve ``did``: raised before the runner resolves it, so a caller
    cannot make the runner connect to a host of their choosing (a did:web) by naming it."""

    def __init__(self, did: str, message: str | None = None) -> None:
        super().__init__(message or f"{did} is not served by this runner")
        self.did = did


class BundleRefused(AtrundError, code=41):
    """The bundle cannot be run as pinned (CID mismatch, too large)."""


class VersionGone(BundleRefused, code=42):
    """The pinned CID is no longer in the author's repo, nor cached here."""


class EndpointUndeclared(BundleRefused, code=43):
    """The endpoint is not one the bundle record declares."""


class PermissionsRefused(BundleRefused, code=44):
    """The bundle asks for permissions this runner does not grant."""


class SecretError(AtrundError, code=45):
    """A sealed secret cannot be used; the message names the secret, never its value."""


class UnstorableValue(AtrundError, code=46):
    """A value no record can hold, not even as a jsonValue: a string that is not valid Unicode
    (a lone surrogate), NaN or an infinity, or a type JSON does not have. Says what and where."""


class InvalidInvocation(AtrundError, code=47):
    """The invocation record does not match the lexicon (or nests too deep); the message says where."""


class BundleUnavailable(AtrundError, code=48):
    """The pinned bundle could not be fetched (its author's DID or PDS, or the local cache failed).
    ``__cause__`` is what failed: the gateway answers by it."""


class ExecutorError(AtrundError, code=50,
                    fix="`atrund doctor` shows which isolation works on this host and why the others do not"):
    """The executor itself failed (could not start a worker, backend gone)."""


class UnknownRuntime(ExecutorError, code=51, fix="use one of those, or add a runtime directory under nix/runtimes/"):
    """No runtime directory of that name (the message lists those there are)."""


class InvalidSchedule(AtrundError, code=49, fix="see dev.atrun.schedule in docs/protocol.md"):
    """A dev.atrun.schedule record the runner does not run (its fields, its cron expression or
    time zone); the message says which."""


class ImageError(AtrundError, code=52):
    """The runtime image could not be built; the message says which step and why."""


class LocalStackError(AtrundError, code=53):
    """The stack could not be started or used; the message carries its log tail."""



class UnknownBackend(AtrundError, ValueError, code=54):
    """A name that is neither a backend, ``auto``, nor an alias of a backend (the message lists
    them). Also a ValueError: the configuration's validators raise it as pydantic expects."""


class DropFailed(AtrundError, code=56, fix="set runner.user to an existing user (name, or uid[:gid]), and start serve as root"):
    """`atrund serve` was told to run as ``[runner] user`` and could not: the user does not exist,
    serve was not started as root, the privileged helper did not start, or the kernel refused a
    step of the drop. The message names which."""


class CopyRefused(AtrundError, code=57, fix="copy into a new, empty database (createdb), or drop and recreate the one named"):
    """`atrund state copy` cannot copy: the target database already holds atrund state (or a
    replica), or the SQLite state has a table this atrund does not know."""


class StateMoved(AtrundError, code=58, fix="run the runner with [state] url = the database it was copied into; to use this "
                                           "directory again anyway, delete its file `moved` (its pending work would run twice)"):
    """This SQLite state directory was copied into Postgres by `atrund state copy`: opening it
    again would run its pending invocations a second time."""


class HelperGone(AtrundError, code=59, fix="packaging/atrund.service's Restart=on-failure starts the runner again; "
                                          "under another supervisor, start it again (and see what the log says killed the helper)"):
    """Under ``[runner] user``, the privileged helper (the one process that starts workers, as
    root) is gone, and an unprivileged runner cannot start another: serve stops, with its running
    work recorded as usual, so that its service manager starts the whole runner again."""


def tree() -> list[type[AtrundError]]:
    """AtrundError and every subclass, depth first: the table above, as classes."""
    out: list[type[AtrundError]] = []
    stack: list[type[AtrundError]] = [AtrundError]
    while stack:
        cls = stack.pop()
        out.append(cls)
        stack.extend(reversed(cls.__subclasses__()))
    return out


def describe(e: AtrundError) -> str:
    """One line for a person: the message, then the fix when the message does not say it."""
    message = "; ".join(line.strip() for line in str(e).splitlines() if line.strip()) or type(e).__name__
    return f"{message} ({e.fix})" if e.fix else message
