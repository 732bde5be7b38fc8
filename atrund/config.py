"""Runner configuration: one TOML file, validated by pydantic.

Unknown keys are errors (a typo must not silently fall back to a default), and every error
names the TOML key it is about (``access.mode: Input should be ...``). Secrets never live in
this file: the runner's app password comes from an environment variable or a file it names.
"""

from __future__ import annotations

import ipaddress
import os
import re
import tomllib
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, field_validator, model_validator

from atrund.errors import ConfigError, UnknownBackend
from atrund.execute.registry import ALIASES, AUTO, NAMES, accepted, canonical

REPO_ROOT = Path(__file__).resolve().parent.parent
RUNTIMES_DIR = REPO_ROOT / "nix" / "runtimes"



class Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


def url_problem(value: str, schemes: tuple[str, ...]) -> str | None:
    """What is wrong with ``value`` as a URL of one of ``schemes`` (None: nothing), naming the fix:
    a PDS URL without its scheme is the common slip, and would otherwise surface as unreachable."""
    parts = urlsplit(value)
    if parts.scheme in schemes and parts.netloc:
        return None
    return (f"{value!r} is not a {' or '.join(s + '://' for s in schemes)} URL "
            f"(did you mean {schemes[-1]}://{value.split('://')[-1]}?)")


def _url(*schemes: str) -> AfterValidator:
    def check(value: str) -> str:
        if problem := url_problem(value, schemes):
            raise ValueError(problem)
        return value
    return AfterValidator(check)


def is_did_or_handle(value: str) -> bool:
    """A DID, or what may be a handle (dotted, of a handle's characters): the handle's full syntax
    is checked when it is resolved (atrund.atproto.identity), and a bad one named then."""
    return value.startswith("did:") or re.fullmatch(r"@?[A-Za-z0-9-]+(\.[A-Za-z0-9-]+)+", value) is not None


HttpUrl = Annotated[str, _url("http", "https")]
WsUrl = Annotated[str, _url("ws", "wss")]


class RunnerSection(Section):
    pds: HttpUrl = Field(description="URL of the runner account's PDS")
    identifier: str = Field(description="handle or DID of the runner account")
    password_env: str = "ATRUND_APP_PASSWORD"
    password_file: Path | None = None
    description: str = "An atrund runner."
    shutdown_grace: float = Field(
        default=10.0, ge=0, description="seconds running invocations and requests may take to finish when the runner stops; "
        "past it they are stopped, and each invocation gets an interrupted result")
    user: str | None = Field(
        default=None, description="run as this user (name, or uid[:gid]): serve starts as root, starts the privileged "
        "helper, hands over the state and work directories, and drops for good; unset: serve keeps the uid it started with")
    roles: list[Literal["ingest", "execute", "gateway"]] = Field(
        default=["ingest", "execute", "gateway"], min_length=1,
        description="what this replica does (replicas share state.url): ingest (when it leads), execute, gateway")
    hot_affinity: bool = Field(
        default=True, description="replicas: tell the fleet which bundles this replica holds hot workers for, so that "
        "new authors' work for them is assigned here while it keeps up (false: assigned as if it held none)")

    @field_validator("roles")
    @classmethod
    def _distinct(cls, value: list[str]) -> list[str]:
        if len(set(value)) != len(value):
            raise ValueError("names a role twice")
        return value

    def password(self) -> str:
        """The app password: from password_file if set, else from the environment variable."""
        if self.password_file is not None:
            try:
                return self.password_file.expanduser().read_text().strip()
            except OSError as e:
                raise ConfigError(f"runner.password_file: cannot read {self.password_file}: {e.strerror}") from e
        value = os.environ.get(self.password_env, "")
        if not value:
            raise ConfigError(
                f"runner.password_env: environment variable {self.password_env} is empty or unset "
                "(set it to the runner account's app password, or set runner.password_file)"
            )
        return value


PLC_DIRECTORY = "https://plc.directory"  # the public DID directory: the default wherever one is read


class IdentitySection(Section):
    plc_url: HttpUrl = PLC_DIRECTORY
    cache_seconds: int = Field(default=300, ge=0)
    timeout_seconds: float = Field(default=10.0, gt=0)
    cache_size: int = Field(default=10_000, ge=1)  # DID documents (and handles) cached at most: an LRU
    allow_private_addresses: bool = Field(
        default=False, description="let the runner's reads (PLC, DID documents, PDSes, blobs, handles, the relay) connect to "
        "loopback, private and link-local addresses; only for a local stack (atrund.atproto.addresses)")


class AccessSection(Section):
    mode: Literal["allowlist", "blocklist", "open", "follows", "list"] = "allowlist"
    allowlist: list[str] = []
    blocklist: list[str] = []
    operator: str | None = Field(default=None, description="follows mode: DID whose follows are served; default: the runner account")
    list_uri: str | None = Field(default=None, description="list mode: AT URI of an app.bsky.graph.list whose members are served")
    refresh_interval: float = Field(default=300.0, ge=1, description="seconds between re-reads of the follows or the list")
    policy_file: Path | None = Field(default=None, description="what `atrund access allow|deny` edits; default: state.dir/access.json "
                                     "(with state.url: the database, for every replica)")

    @model_validator(mode="after")
    def _dids(self) -> "AccessSection":
        # A handle is resolved (and verified both ways) when the runner starts: atrund.trust.
        for key in ("allowlist", "blocklist"):
            for i, who in enumerate(getattr(self, key)):
                if not is_did_or_handle(who):
                    raise ValueError(f"{key}[{i}]: {who!r} is not a DID or a handle (expected did:plc:..., did:web:... "
                                     "or alice.example.com)")
        if self.operator is not None and not is_did_or_handle(self.operator):
            raise ValueError(f"operator: {self.operator!r} is not a DID or a handle (expected did:plc:... or did:web:...)")
        if self.mode == "list":
            if self.list_uri is None:
                raise ValueError('list_uri: required when mode = "list" (at://DID/app.bsky.graph.list/RKEY)')
            if not re.fullmatch(r"at://did:[a-z]+:[A-Za-z0-9._:%-]+/app\.bsky\.graph\.list/[A-Za-z0-9._~:-]+", self.list_uri):
                raise ValueError(f"list_uri: {self.list_uri!r} is not the AT URI of a list (at://DID/app.bsky.graph.list/RKEY)")
        return self


class IngestSection(Section):
    mode: Literal["poll", "firehose"] = "poll"
    firehose_url: WsUrl | None = Field(default=None, description="ws(s):// of a relay or PDS; default: the runner's PDS")
    poll_interval: float = Field(default=2.0, gt=0)
    reconcile_interval: float = Field(default=300.0, gt=0, description="seconds between full rescans of each author's invocations")
    authors: list[str] | None = Field(
        default=None, description="DIDs (or handles) whose repos are polled; default: everyone the access policy names (allowlist, follows, list)"
    )


class LimitsSection(Section):
    """Fairness: per-author limits, so one author cannot crowd out the others."""

    per_author_concurrency: int = Field(default=1, ge=1, description="an author's invocations running at once (1: in order)")
    per_author_per_minute: float = Field(default=60.0, gt=0, description="invocations an author may start per minute")
    per_author_burst: int = Field(default=10, ge=1, description="starts an author may make at once before the rate applies")
    per_author_backlog: int = Field(default=1000, ge=1, description="invocations an author may have waiting; more get rejected")


class SchedulesSection(Section):
    """dev.atrun.schedule records (atrund.ticks)."""

    enabled: bool = Field(default=True, description="run schedules addressed to this runner")
    min_interval_seconds: int = Field(default=60, ge=1, description="a schedule that may tick more often is refused")
    max_per_author: int = Field(default=50, ge=0, description="schedules of one author that run; the newest past it are refused")
    jitter_seconds: int = Field(default=30, ge=0, description="a tick starts up to this long after its time (fixed per schedule)")


class TriggersSection(Section):
    """dev.atrun.trigger records (atrund.triggers): firehose ingest only."""

    enabled: bool = Field(default=True, description="fire triggers addressed to this runner (with ingest.mode = firehose)")
    max_per_author: int = Field(default=20, ge=0, description="triggers of one author followed; the newest past it are refused")
    per_minute: float = Field(default=60.0, gt=0, description="firings one trigger may start per minute (burst: the same number)")
    backlog: int = Field(default=100, ge=1, description="firings one trigger may have waiting; more are dropped and counted")
    max_collections: int = Field(default=64, ge=1, description="distinct collections all triggers together may follow")


class BundlesSection(Section):
    max_bytes: int = Field(default=1_048_576, gt=0)


class ProcessSection(Section):
    """The ``process`` backend: workers as unprivileged uids in a kernel sandbox."""

    uid_base: int = Field(default=910_000, ge=1000, description="first uid of the workers")
    uids: int = Field(default=256, ge=1, description="uids in that range (one per live worker)")
    fork_server: bool = Field(default=True, description="start workers from a fork server (fast cold starts); "
                              "false: exec a fresh sandbox and interpreter for each")
    seccomp: Literal["allowlist", "denylist"] = Field(
        default="allowlist", description="allowlist: a worker may make only the system calls its runtime's syscalls file "
        "lists (the rest answer EPERM); denylist: all but the dangerous few (a runtime without a syscalls file gets that)")


class ContainerSection(Section):
    """The ``container`` backend: a container per worker on a Docker engine."""

    docker_host: str | None = Field(
        default=None, description="the engine's API socket; default $DOCKER_HOST, else unix:///var/run/docker.sock")
    image: str = Field(default="atrund-runtime:latest", description="the runtime image (`atrund image build`)")
    runtime: Literal["runc", "runsc"] = Field(default="runc", description="OCI runtime; runsc is gVisor")
    cpus: float = Field(default=1.0, gt=0, description="CPUs a worker may use")
    uid: int = Field(default=900_000, ge=1, description="the unprivileged uid bundles run as")
    seccomp: Literal["allowlist", "engine"] = Field(
        default="allowlist", description="allowlist: the process backend's filter (the runtime's syscalls file, the rest "
        "EPERM; no AF_VSOCK or AF_UNIX sockets) as the container's seccomp profile; engine: the engine's default profile")


class MicroVmSection(Section):
    """The ``microvm`` backend: a virtual machine per worker, under QEMU or Firecracker."""

    monitor: Literal["auto", "qemu", "firecracker"] = Field(
        default="auto", description="the monitor; auto takes firecracker if its binary and /dev/kvm exist, else qemu")
    accelerator: Literal["auto", "kvm", "tcg"] = Field(
        default="auto", description="under qemu: kvm if a KVM guest really boots here, else tcg (software)")
    qemu_binary: str = Field(default="qemu-system-x86_64", description="the QEMU binary (-M microvm)")
    firecracker_binary: str = Field(default="firecracker", description="the Firecracker binary")
    jailer_binary: str | None = Field(default=None, description="start Firecracker under this jailer")
    jailer_uid: int = Field(default=65534, ge=1, description="the uid (and gid) the jailer drops to")
    kernel: Path = Field(default=Path("/var/cache/atrund/vm/vmlinux"), description="uncompressed guest kernel (ELF)")
    initramfs: Path | None = Field(default=Path("/var/cache/atrund/vm/initramfs.img"), description="the guest's initramfs")
    rootfs: Path = Field(default=Path("/var/cache/atrund/vm/rootfs.ext4"), description="the guest root (opened read-only)")
    vcpus: int = Field(default=1, ge=1, le=32, description="vCPUs per VM")
    overhead_mb: int = Field(default=128, ge=32, description="guest memory for its kernel and init, beyond the bundle's")
    boot_timeout: float = Field(default=90.0, gt=0, description="seconds a VM may take to boot and say it is ready")
    kernel_args: str = Field(default="", description="extra guest kernel command line")


# Keys that lived flat in [executor] until the per-backend sections: old key -> (section, key).
# They still load, with a warning naming where each lives now (Config.warnings).
MOVED = {
    "sandbox_uid_base": ("process", "uid_base"),
    "sandbox_uids": ("process", "uids"),
    "docker_host": ("container", "docker_host"),
    "image": ("container", "image"),
    "runtime": ("container", "runtime"),
    "cpus": ("container", "cpus"),
    "container_uid": ("container", "uid"),
    "vm_monitor": ("microvm", "monitor"),
    "vm_accelerator": ("microvm", "accelerator"),
    "qemu_binary": ("microvm", "qemu_binary"),
    "firecracker_binary": ("microvm", "firecracker_binary"),
    "jailer_binary": ("microvm", "jailer_binary"),
    "jailer_uid": ("microvm", "jailer_uid"),
    "vm_kernel": ("microvm", "kernel"),
    "vm_initramfs": ("microvm", "initramfs"),
    "vm_rootfs": ("microvm", "rootfs"),
    "vm_vcpus": ("microvm", "vcpus"),
    "vm_overhead_mb": ("microvm", "overhead_mb"),
    "vm_boot_timeout": ("microvm", "boot_timeout"),
    "vm_kernel_args": ("microvm", "kernel_args"),
}


class ExecutorSection(Section):
    """What every backend shares; each backend's own settings are in its subsection."""

    isolation: str = Field(default=AUTO, description=f"one of {', '.join(NAMES)}")
    warm: int = Field(default=2, ge=0, description="warm workers kept per runtime")
    warm_by_runtime: dict[str, int] = Field(default={}, description="per-runtime override of warm, e.g. {deno = 0}")
    reuse: Literal["bundle", "never"] = Field(
        default="bundle", description="keep a worker for the next request of the same bundle, grants and secrets; "
                                      "never: a new worker for every request")
    max_requests: int = Field(default=1000, ge=1, description="requests one reused worker serves before it is replaced")
    max_idle_seconds: float = Field(default=60, ge=0, description="a hot worker idle this long is stopped")
    hot_max: int = Field(default=16, ge=0, description="hot workers kept in all; the least recently used go first")
    hot_memory_mb: int = Field(default=2048, ge=0, description="memory of all hot workers together; least recently used go first")
    memory_high_water_percent: int = Field(default=75, ge=1, le=100,
                                           description="a worker holding more than this share of memory_mb is replaced")
    concurrency: int = Field(default=4, ge=1)
    default_timeout: int = Field(default=30, ge=1)
    max_timeout: int = Field(default=300, ge=1)
    max_output_bytes: int = Field(default=65_536, ge=1024)
    output_bytes: int = Field(default=16_384, ge=0, le=1 << 20,
                              description="the last bytes a bundle prints per request that are kept (atrund exec, atrund logs)")
    memory_mb: int = Field(default=512, ge=16)
    max_processes: int = Field(default=64, ge=8, description="processes (threads count) a worker may run")
    work_dir: Path | None = Field(default=None, description="where workers' private directories live; default /run/atrund-work")
    tmp_mb: int = Field(default=64, ge=1, description="size of a worker's private /tmp (a tmpfs)")
    runtimes_dir: Path = RUNTIMES_DIR
    egress_nameserver: str | None = Field(
        default=None, description="host:port of the DNS server the egress proxy asks for granted names; default the system resolver")
    process: ProcessSection = ProcessSection()
    container: ContainerSection = ContainerSection()
    microvm: MicroVmSection = MicroVmSection()
    _moved: list[str] = PrivateAttr(default_factory=list)

    @model_validator(mode="wrap")
    @classmethod
    def _old_keys(cls, data: Any, handler: Any) -> "ExecutorSection":
        """Flat keys of before the per-backend sections load into their section, noted for a warning."""
        moved = []
        if isinstance(data, dict) and data.get("isolation") in ALIASES:
            moved.append(f"executor.isolation: {data['isolation']!r} is the old name of {ALIASES[data['isolation']]!r}; "
                         "it still works")
        if isinstance(data, dict) and any(key in data for key in MOVED):
            data = dict(data)
            for old, (section, key) in MOVED.items():
                if old not in data:
                    continue
                value = data.pop(old)
                sub = data.get(section, {})
                sub = dict(sub) if isinstance(sub, dict) else sub.model_dump(exclude_unset=True)
                if key in sub:
                    raise ValueError(f"{old} and {section}.{key} are both set: keep only {section}.{key}")
                sub[key] = value
                data[section] = sub
                moved.append(f"executor.{old}: moved to executor.{section}.{key} ([executor.{section}] {key} = ...); "
                             "the old key still works")
        model = handler(data)
        model._moved = moved
        return model

    @field_validator("isolation")
    @classmethod
    def _isolation(cls, value: str) -> str:
        try:
            return canonical(value)
        except UnknownBackend:
            raise ValueError(f"{value!r} is not a backend (available: {accepted()})") from None

    @property
    def warnings(self) -> list[str]:
        """What loaded but should be written differently (moved keys, an old isolation name)."""
        return list(self._moved)


class PermissionsSection(Section):
    """What the runner grants when a bundle's record asks for it; nothing by default."""

    net: list[str] = Field(default=[], description='hosts, host:port, "*.example.com", or "*"')
    read: list[str] = Field(default=[], description="absolute paths (and everything below them)")
    write: list[str] = Field(default=[], description="absolute paths (and everything below them)")
    env: list[str] = Field(default=[], description='variable names, or "*"')
    net_private: list[str] = Field(default=[], description="CIDR ranges of loopback, private, link-local, ... addresses "
                                   "a net grant may reach (the egress proxy refuses them otherwise)")

    @field_validator("net_private")
    @classmethod
    def _net_private(cls, value: list[str]) -> list[str]:
        for cidr in value:
            try:
                ipaddress.ip_network(cidr, strict=False)
            except ValueError:
                raise ValueError(f"{cidr!r} is not an address or CIDR range (e.g. 10.1.2.0/24)") from None
        return value


class GatewaySection(Section):
    """The HTTP side: the gateway to bundles' handleRequest, XRPC invoke, /healthz and /metrics."""

    enabled: bool = True
    listen: str = Field(default="127.0.0.1:8080", description="host:port; loopback by default (put a reverse proxy in front)")
    public_url: HttpUrl | None = Field(default=None, description="URL published in the runner record; default http://LISTEN")
    rate_per_minute: float = Field(default=600.0, gt=0, description="requests per minute per bundle (token bucket)")
    burst: int = Field(default=60, ge=1, description="requests a bundle may take at once before the rate applies")
    max_body_bytes: int = Field(default=1_048_576, ge=0, description="largest request body; more is answered 413")
    timeout: int = Field(default=10, ge=1, description="seconds a handleRequest may run (capped by executor.max_timeout)")
    max_waiting: int = Field(default=64, ge=0, description="requests that may wait for an execution slot; more get 503")
    latest_cache_seconds: float = Field(default=5.0, ge=0, description="how long 'latest bundle version' is trusted without asking the PDS")
    token_leeway_seconds: int = Field(default=5, ge=0, description="clock skew allowed on service-auth tokens' exp and iat")

    @field_validator("listen")
    @classmethod
    def _listen(cls, value: str) -> str:
        host, sep, port = value.rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
            raise ValueError(f"{value!r} is not host:port (e.g. 127.0.0.1:8080)")
        return value

    @property
    def host(self) -> str:
        return self.listen.rpartition(":")[0].strip("[]")

    @property
    def port(self) -> int:
        return int(self.listen.rpartition(":")[2])


class SecretsSection(Section):
    """The runner's X25519 key pair for sealed secrets (``atrund keys init`` creates it)."""

    key_file: Path | None = Field(default=None, description="private key (PEM, mode 0600); default: state.dir/secrets.key")
    old_key_files: list[Path] = Field(default=[], description="earlier keys: what was sealed to them still opens")


class LogsSection(Section):
    """What runs printed (executor.output_bytes of each) and why they failed, kept for the
    bundle's author and the invoker (atrund logs, atrund tail)."""

    retention_hours: float = Field(default=72, gt=0, description="entries older than this are deleted")
    max_entries: int = Field(default=20_000, ge=1, description="entries kept in all; the oldest go first")


class StateSection(Section):
    dir: Path = Path("atrund-state")
    url: str | None = Field(default=None, description="postgresql:// URL of a Postgres database for the state "
                                                       "(default: SQLite in dir; dir still holds the local files)")

    @field_validator("url")
    @classmethod
    def _postgres_url(cls, value: str | None) -> str | None:
        """A libpq URL without its password: secrets never live in this file (libpq reads it from
        PGPASSWORD, PGPASSFILE or ~/.pgpass)."""
        if value is None:
            return None
        parts = urlsplit(value)
        if parts.scheme not in ("postgresql", "postgres"):
            raise ValueError(f"{value.split('@')[-1]!r} is not a postgresql:// URL")
        if parts.password is not None or re.search(r"(^|&)password=", parts.query):
            raise ValueError("holds a password; give it in PGPASSWORD, a PGPASSFILE or ~/.pgpass instead "
                             "(secrets never live in the configuration file)")
        return value


STATE_CALL_OVERHEAD = 2048  # bytes of a set call besides its value: the key (at most 512 bytes), the envelope


class BundleStateSection(Section):
    """Quotas of bundles' durable key-value state (docs/protocol.md §7.6), per namespace (one
    per bundle author and record key). A call past one fails inside the bundle
    (StateQuotaExceeded), and nothing of that run commits."""

    max_keys: int = Field(default=10_000, ge=1, description="keys one namespace may hold")
    max_value_bytes: int = Field(default=16_384, ge=16, description="bytes of one value (its JSON text, UTF-8)")
    max_bytes: int = Field(default=10_485_760, ge=1024, description="bytes of one namespace: its keys and values together")
    max_ops_per_run: int = Field(default=1_000, ge=1, description="state calls (get, set, delete, list) one run may make")


class Config(Section):
    runner: RunnerSection
    identity: IdentitySection = IdentitySection()
    access: AccessSection = AccessSection()
    ingest: IngestSection = IngestSection()
    bundles: BundlesSection = BundlesSection()
    executor: ExecutorSection = ExecutorSection()
    limits: LimitsSection = LimitsSection()
    schedules: SchedulesSection = SchedulesSection()
    triggers: TriggersSection = TriggersSection()
    permissions: PermissionsSection = PermissionsSection()
    gateway: GatewaySection = GatewaySection()
    secrets: SecretsSection = SecretsSection()
    logs: LogsSection = LogsSection()
    state: StateSection = StateSection()
    bundle_state: BundleStateSection = BundleStateSection()
    _source: Path | None = PrivateAttr(default=None)  # the file it was loaded from (a running runner re-reads it)

    @model_validator(mode="after")
    def _roles_need_replicas(self) -> "Config":
        if set(self.runner.roles) != {"ingest", "execute", "gateway"} and self.state.url is None:
            raise ValueError("runner.roles: a replica of fewer roles needs a shared state.url (one SQLite runner does "
                             "everything)")
        if self.access.policy_file is not None and self.state.url is not None:
            raise ValueError("access.policy_file: with state.url, what `atrund access allow|deny` edits is kept in that "
                             "database for every replica; remove access.policy_file")
        return self

    @model_validator(mode="after")
    def _values_fit_the_channel(self) -> Config:
        # A set call travels as one line on the worker's answer channel, which takes max_output_bytes.
        room = self.executor.max_output_bytes - STATE_CALL_OVERHEAD
        if self.bundle_state.max_value_bytes > room:
            raise ValueError(f"bundle_state.max_value_bytes ({self.bundle_state.max_value_bytes}) must leave room for the "
                             f"call in executor.max_output_bytes: at most {room}")
        return self

    @property
    def source(self) -> Path | None:
        return self._source

    @property
    def warnings(self) -> list[str]:
        """One line per thing that loaded but should be written differently (a moved key)."""
        return self.executor.warnings

    @property
    def key_file(self) -> Path:
        return self.secrets.key_file if self.secrets.key_file is not None else self.state.dir / "secrets.key"

    @property
    def access_file(self) -> Path:
        return self.access.policy_file if self.access.policy_file is not None else self.state.dir / "access.json"


def _describe(err: ValidationError) -> str:
    lines = []
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"]) or "(top level)"
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            msg = "unknown key (check the spelling against config.toml.example)"
        elif e["type"] == "missing":
            msg = "required key is missing"
        lines.append(f"{key}: {msg}")
    return "\n".join(lines)


def parse(data: dict, base_dir: Path | None = None) -> Config:
    try:
        cfg = Config.model_validate(data)
    except ValidationError as e:
        raise ConfigError(_describe(e)) from None
    if base_dir is not None:  # relative paths are relative to the config file, not the working directory
        if not cfg.state.dir.is_absolute():
            cfg.state.dir = base_dir / cfg.state.dir
        pw = cfg.runner.password_file
        if pw is not None and not pw.expanduser().is_absolute():
            cfg.runner.password_file = base_dir / pw
        for section, key in (("", "work_dir"), ("", "runtimes_dir"), ("microvm", "kernel"), ("microvm", "initramfs"),
                             ("microvm", "rootfs")):
            holder = getattr(cfg.executor, section) if section else cfg.executor
            value = getattr(holder, key)
            if value is not None and not value.is_absolute():
                setattr(holder, key, base_dir / value)
        rel = lambda p: None if p is None else (p.expanduser() if p.expanduser().is_absolute() else base_dir / p)  # noqa: E731
        cfg.secrets.key_file = rel(cfg.secrets.key_file)
        cfg.secrets.old_key_files = [rel(p) for p in cfg.secrets.old_key_files]
        cfg.access.policy_file = rel(cfg.access.policy_file)
    return cfg


def read(path: Path) -> dict:
    """A config file's TOML as a dict, not yet validated; ConfigError if it cannot be read."""
    try:
        return tomllib.loads(path.read_text())
    except OSError as e:
        raise ConfigError(f"{path}: cannot read: {e.strerror}") from e
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: not valid TOML: {e}") from e


def load(path: Path) -> Config:
    """Read and validate a config file; relative state paths are relative to the file. What
    loads but should be written differently is in ``Config.warnings`` (the CLI prints them)."""
    cfg = parse(read(path), base_dir=path.resolve().parent)
    cfg._source = path.resolve()
    return cfg
