"""The container backend's seccomp profile: the process backend's filter, given to the engine.

A container worker runs the same at-run-exec and interpreters as a process worker, so it gets
the same allowlist (the runtime's ``syscalls`` file and ``syscalls.base``, with the same
argument rules: socket() only for IPv4, IPv6 and netlink, socketpair() only stream pairs, no
user namespaces; fence.seccomp_plan is the one description of both). The engine's own default
profile lets a container create AF_VSOCK sockets (Docker 20.10 here: one bound and listened on
with no network at all), which this one refuses. runc loads the profile before the container's
first program (the engine's init) runs, with no_new_privs, so nothing in the container can
remove it. gVisor (runsc) applies an OCI profile only with its ``--oci-seccomp`` flag: its own
kernel is the filter there (and it has no AF_VSOCK).
"""

from __future__ import annotations

import functools
import json

from atrund.execute.process import fence

OPS = {fence.SCMP_CMP_EQ: "SCMP_CMP_EQ", fence.SCMP_CMP_MASKED_EQ: "SCMP_CMP_MASKED_EQ"}

# What runs in a container besides the runtime: the engine's init (docker-init, tini; PID 1 with
# init=True) makes itself a subreaper, forks the command, forwards signals and reaps, all calls
# of an ordinary process's life that syscalls.base already holds; these are the ones it adds.
ENGINE_INIT = ("prctl", "rt_sigtimedwait", "setpgid", "getpgid", "wait4", "kill")


@functools.cache  # one per runtime: built once, sent with every container it starts
def profile(allowed: tuple[str, ...]) -> str:
    """The profile (JSON, as the engine's ``seccomp=`` security option takes it) that allows
    ``allowed`` and the engine's init; every other call answers EPERM."""
    default, rules = fence.seccomp_plan([*allowed, *ENGINE_INIT])
    plain = [name for name, answer, cmps in rules if answer is None and not cmps]
    syscalls = [{"names": plain, "action": "SCMP_ACT_ALLOW"}]
    for name, answer, cmps in rules:
        if answer is None and not cmps:
            continue
        entry = {"names": [name], "action": "SCMP_ACT_ALLOW"} if answer is None else \
            {"names": [name], "action": "SCMP_ACT_ERRNO", "errnoRet": answer}
        if cmps:
            entry["args"] = [{"index": arg, "value": a, "valueTwo": b, "op": OPS[op]} for arg, op, a, b in cmps]
        syscalls.append(entry)
    return json.dumps({"defaultAction": "SCMP_ACT_ERRNO", "defaultErrnoRet": default, "syscalls": syscalls},
                      separators=(",", ":"))
