"""The container backend's seccomp profile: the process backend's filter, given to the engine.

A container worker runs the same at-run-exec and interpreters as a process worker, so it gets
the same allowlist (the runtime's ``syscalls`` file and ``syscalls.base``, with the same
argument rules: socket() only for IPv4, IPv6 and netlink, socketpair() only stream pairs, no
namespaces; fence.seccomp_plan is the one description of both). The engine's own default profile
may let a container create AF_VSOCK sockets (Debian's Docker 20.10.24 here: one bound and
listened on with no network at all; upstream moby denies it since 23.0), which this one refuses.
The engine's init (docker-init, tini: PID 1 with init=True) needs nothing beyond syscalls.base.
The profile names no architecture, so runc filters the native one only: a call through another
ABI (i386's int 0x80, x32) kills the caller (SIGSYS), where the engine's default allows them.
runc loads the profile before the container's first program runs, with no_new_privs, so nothing
in the container can remove it. gVisor (runsc) applies an OCI profile only with its
``--oci-seccomp`` flag: its own kernel is the filter there (and it has no AF_VSOCK).
"""

from __future__ import annotations

import functools
import json

from atrund.execute.process import fence

OPS = {fence.SCMP_CMP_EQ: "SCMP_CMP_EQ", fence.SCMP_CMP_MASKED_EQ: "SCMP_CMP_MASKED_EQ"}


@functools.cache  # one per runtime: built once, sent with every container it starts
def profile(allowed: tuple[str, ...]) -> str:
    """The profile (JSON, as the engine's ``seccomp=`` security option takes it) that allows
    ``allowed`` (with fence's argument rules); every other native call answers EPERM."""
    default, rules = fence.seccomp_plan(allowed)
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
