"""`atrund serve` as its own user (``[runner] user``): privilege separation.

The runner parses PDS answers, firehose frames and HTTP requests from anyone; a bug there must
not be a root bug. So, when ``[runner] user`` is set and serve starts as root, this runs first,
before the event loop and before any thread exists:

1. launch the privileged helper, the process backend's fork server (process/forked.py), with a
   policy fixed now (process/backend.helper_policy): which runtimes, which uid range, which
   work root, which granted roots. It stays root and does only what the policy allows
   (forkserver.py: fork a fenced worker, mount or detach a worker's /tmp, make an egress
   namespace, start a microVM's monitor from a command fixed in the policy, kill a worker or
   monitor it started), told only names and numbers, each checked. Backends without root work
   (none) need no helper; auto is probed first (as root, as it always is), and so is microvm's
   accelerator (the trial KVM boot opens /dev/kvm);
2. hand over what the runner writes: the state directory (its files), the key files, the work
   root, and a cgroup parent of its own (``atrund/u{uid}`` under memory and pids);
3. read what only root may read and the runner needs once: the app password;
4. drop for good: the capability bounding set emptied, supplementary groups set to the user's
   group and only what the backend needs (the Docker socket's group for container), then
   setresgid and setresuid (which clear every capability), and no_new_privs.

A failure says which step and stops serve (DropFailed). Without ``[runner] user`` nothing here runs.
"""

from __future__ import annotations

import ctypes
import importlib
import os
import pwd
import threading
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import structlog

from atrund.config import Config, ConfigError
from atrund.errors import DropFailed, ExecutorError
from atrund.execute.microvm.backend import monitor_name, monitor_policy
from atrund.execute.probe import choose
from atrund.execute.process.backend import CGROUP_CONTROLLERS, CGROUP_ROOT, cgroup_name, privileged_helper
from atrund.execute.process.forked import ForkServer
from atrund.execute.registry import AUTO, canonical
from atrund.execute.workdir import work_root

log = structlog.get_logger("atrund.privsep")

PR_CAPBSET_DROP, PR_SET_NO_NEW_PRIVS = 24, 38
HELPED = ("process", "container", "microvm")  # the backends whose root work the helper does
WITHOUT_ROOT = ("none",)  # the backends that need none
# What a backend imports late (inside functions), imported before the drop: the runner's user
# may not be able to read an interpreter installed under a private home (pyenv under /root).
LATE_IMPORTS = {"container": ("docker", "docker.transport.unixconn", "requests.utils"),
                "microvm": ("atrund.execute.container.image", "atrund.execute.microvm.guest")}
_libc = ctypes.CDLL(None, use_errno=True)


@dataclass
class Dropped:
    """What serve keeps from before the drop."""

    uid: int
    gid: int
    helper: ForkServer | None  # the privileged helper, for the backend (None: the backend needs no root)
    password: str  # the runner account's app password, read while root


def user_ids(user: str) -> tuple[int, int]:
    """``name`` or ``uid[:gid]`` (a numeric uid needs no passwd entry; its gid defaults to the
    passwd entry's, else to the uid)."""
    try:
        if user.replace(":", "").isdigit():
            uid_text, _, gid_text = user.partition(":")
            uid = int(uid_text)
            if gid_text:
                gid = int(gid_text)
            else:
                try:
                    gid = pwd.getpwuid(uid).pw_gid
                except KeyError:
                    gid = uid
        else:
            entry = pwd.getpwnam(user)
            uid, gid = entry.pw_uid, entry.pw_gid
    except (KeyError, ValueError):
        raise DropFailed(f"runner.user: no such user {user!r}") from None
    if uid == 0 or gid == 0:
        raise DropFailed(f"runner.user: {user!r} is root (uid or gid 0): name an unprivileged user")
    return uid, gid


def docker_group(docker_host: str | None) -> int | None:
    """The group of the engine's unix socket, which the runner needs to reach it."""
    url = docker_host or os.environ.get("DOCKER_HOST") or "unix:///var/run/docker.sock"
    parsed = urlparse(url)
    if parsed.scheme != "unix":
        return None  # a TCP engine: no group to keep
    try:
        return os.stat(parsed.path).st_gid
    except OSError as e:
        raise DropFailed(f"executor.container.docker_host: cannot reach {parsed.path}: {e.strerror}") from e


def drop_privileges(cfg: Config) -> Dropped:
    """Steps 1 to 4 above; the runner is ``[runner] user`` when it returns."""
    assert cfg.runner.user is not None
    if os.geteuid() != 0:
        raise DropFailed(f"runner.user is {cfg.runner.user!r}, but serve runs as uid {os.geteuid()}, not root: "
                         "start it as root (it drops to that user), or unset runner.user")
    uid, gid = user_ids(cfg.runner.user)
    e = cfg.executor
    isolation = canonical(e.isolation)
    if isolation == AUTO:  # probed now, as root, as auto always is: the runner could not probe process once dropped
        isolation = e.isolation = choose(e)
    if isolation not in HELPED + WITHOUT_ROOT:
        raise ConfigError(f"executor.isolation: {isolation} cannot run under runner.user yet; "
                          f"use one of {', '.join(HELPED + WITHOUT_ROOT)}")
    if isolation == "process" and not e.process.fork_server:
        raise ConfigError("executor.process.fork_server: an unprivileged runner (runner.user) starts every worker "
                          "from the fork server: it cannot be false")
    monitors = None
    if isolation == "microvm":  # what monitors the helper may start: QEMU's command per runtime, fixed now
        if (monitor := monitor_name(e)) != "qemu":
            raise ConfigError(f"executor.microvm.monitor: {monitor} cannot run under runner.user yet (its jailer is not "
                              "driven by the privileged helper); set it to qemu")
        try:
            monitors = monitor_policy(e)
        except ExecutorError as err:
            raise DropFailed(f"the privileged helper cannot start microVMs: {err}") from err
    groups = [gid]
    if isolation == "container" and (engine := docker_group(e.container.docker_host)) is not None:
        groups.append(engine)
    password = cfg.runner.password()
    for module in LATE_IMPORTS.get(isolation, ()):
        importlib.import_module(module)
    hand_over(cfg, isolation, uid, gid)
    helper = None
    if isolation in HELPED:
        helper = privileged_helper(e, isolation == "process", list(cfg.permissions.read), list(cfg.permissions.write), uid, gid)
        if monitors is not None:
            helper.policy.update(monitors)
        try:
            helper.launch()
        except ExecutorError as err:
            raise DropFailed(f"the privileged helper did not start: {err}") from err
    become(uid, gid, groups)
    stdlib = os.path.dirname(os.__file__)
    if not os.access(stdlib, os.R_OK | os.X_OK):
        log.warning("runner.user cannot read the Python standard library: a module first imported from now on "
                    "fails; install Python where every user can read it", stdlib=stdlib)
    log.info("running as an unprivileged user", user=cfg.runner.user, uid=uid, gid=gid, groups=groups,
             helper=helper.pid if helper else None)
    return Dropped(uid, gid, helper, password)


def hand_over(cfg: Config, isolation: str, uid: int, gid: int) -> None:
    """Make what the runner writes its own: the state directory and its files, the key files, the
    work root, its cgroup parent. Never through a symlink (lchown; the walk does not follow)."""
    try:
        cfg.state.dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        _own_tree(cfg.state.dir, uid, gid)
        for key in [cfg.key_file, *cfg.secrets.old_key_files]:
            if key.exists():
                os.lchown(key, uid, gid)
        if isolation in HELPED:
            root = Path(os.path.abspath(work_root(cfg.executor.work_dir)))
            root.mkdir(mode=0o711, parents=True, exist_ok=True)
            _own_tree(root, uid, gid, depth=1)
            if isolation == "process":
                for controller in CGROUP_CONTROLLERS:
                    parent = CGROUP_ROOT / controller / cgroup_name(uid)
                    try:
                        parent.mkdir(parents=True, exist_ok=True)
                    except OSError:
                        continue  # no writable cgroup v1 here: the backend limits each process only, as when root
                    os.chown(parent, uid, gid)  # the fence (root) moves each worker into its child
    except OSError as e:
        raise DropFailed(f"cannot hand {e.filename} over to runner.user: {e.strerror}") from e


def _own_tree(top: Path, uid: int, gid: int, depth: int | None = None) -> None:
    """``top`` and what is below it (down to ``depth`` levels), owned by uid:gid."""
    os.lchown(top, uid, gid)
    base = len(top.parts)
    for dirpath, dirnames, filenames in os.walk(top):
        level = len(Path(dirpath).parts) - base
        if depth is not None and level >= depth:
            dirnames.clear()
            continue
        for name in dirnames + filenames:
            os.lchown(os.path.join(dirpath, name), uid, gid)


def become(uid: int, gid: int, groups: list[int]) -> None:
    """Drop to uid:gid for good. Before any thread exists: the bounding set and no_new_privs are
    per thread (the uid change itself reaches every thread through glibc)."""
    if threading.active_count() != 1 or len(os.listdir("/proc/self/task")) != 1:
        raise DropFailed("serve must drop privileges before it starts any thread")
    try:
        with open("/proc/sys/kernel/cap_last_cap") as f:
            last = int(f.read())
        for cap in range(last + 1):  # needs CAP_SETPCAP: before the uid change
            if _libc.prctl(PR_CAPBSET_DROP, cap, 0, 0, 0) != 0:
                raise OSError(ctypes.get_errno(), f"PR_CAPBSET_DROP {cap}: {os.strerror(ctypes.get_errno())}")
        os.setgroups(sorted(set(groups)))
        os.setresgid(gid, gid, gid)
        os.setresuid(uid, uid, uid)  # every capability goes with uid 0 (no keep-caps)
        if _libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), f"no_new_privs: {os.strerror(ctypes.get_errno())}")
    except OSError as e:
        raise DropFailed(f"the kernel refused a step of the drop to {uid}:{gid}: {e.strerror or e}") from e
    status = _status()
    if status.get("CapEff") != "0000000000000000" or status.get("CapPrm") != "0000000000000000" \
            or status.get("Uid", "").split() != [str(uid)] * 4:
        raise DropFailed(f"the drop to {uid}:{gid} did not hold: Uid {status.get('Uid')}, CapEff {status.get('CapEff')}")
    try:
        os.setuid(0)
    except PermissionError:
        return
    raise DropFailed("the drop did not hold: uid 0 could be taken back")


def _status() -> dict[str, str]:
    with open("/proc/self/status") as f:
        return {k: v.strip() for k, _, v in (line.partition(":") for line in f)}
