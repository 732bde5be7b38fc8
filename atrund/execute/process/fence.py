"""The fence of the ``process`` backend: applied to a worker before its runtime runs.

Runs as root inside fresh mount, PID, IPC, UTS and network namespaces, made by ``unshare``
on the exec path (``main``) or by the fork server's child (forkserver.py, which imports this
file and calls the same ``enter``). A worker granted network joins instead the namespace the
runner made for it (``join_network``: its only way out is the runner's egress proxy, see
atrund/execute/egress/). Then, in this order, before any bundle code exists in the process:

1. makes every mount private, hides the host (a hostname of its own, /proc with hidepid=2,
   host-wide /proc files empty, no other worker's directory mounted), shows the runtime's own
   directories read-only under
   /run/atrund (wherever they live on the host), and binds the worker's own directory on
   /tmp (the only place it may write unless more is granted);
2. joins the worker's cgroups (memory and process count of the whole tree), and sets hard
   resource limits per process (memory, CPU, file size, open files, processes, no core dumps);
3. sets no_new_privs, drops every group and switches to the worker's own unprivileged uid
   (one uid per worker: workers cannot signal or ptrace each other, and RLIMIT_NPROC counts
   one worker's processes only), then sets the parent-death signal (the uid change clears it);
4. restricts itself with Landlock: read/execute only the runtime and system library paths,
   read the granted paths, write /tmp and the granted paths, TCP connect only to granted
   ports and never bind, no signals or abstract unix sockets beyond its own domain;
5. forks: the child loads a seccomp filter (the runtime's allowlist of system calls; never
   UNIX-socket connects, user namespaces, ptrace/bpf/keyctl/mount/...) and execs the runtime with a clean environment (the fork
   server's child runs the runtime's pre-compiled at-run-exec instead), and this process
   stays as the namespace's init (reaping orphans, passing on the runtime's exit status).

None of this can be undone by the bundle: hard limits cannot be raised without privilege,
the uid change is permanent, and Landlock domains only ever get stricter.

Standalone on purpose (stdlib only, run with ``python3 -I -S``): it must not import the
runner's package or see its environment. Usage: fence.py SPEC_JSON
"""

import ctypes
import json
import os
import resource
import stat
import sys

SYS_landlock_create_ruleset = 444
SYS_landlock_add_rule = 445
SYS_landlock_restrict_self = 446
LANDLOCK_CREATE_RULESET_VERSION = 1
LANDLOCK_RULE_PATH_BENEATH = 1
LANDLOCK_RULE_NET_PORT = 2
PR_SET_PDEATHSIG, PR_SET_NO_NEW_PRIVS = 1, 38
CLONE_NEWNET = 0x40000000
SIGKILL = 9
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC, MS_REMOUNT = 1, 2, 4, 8, 32
MS_BIND, MS_REC, MS_PRIVATE = 4096, 16384, 1 << 18

# Filesystem rights, with the ABI that introduced them.
EXECUTE, WRITE_FILE, READ_FILE, READ_DIR = 1 << 0, 1 << 1, 1 << 2, 1 << 3
REMOVE_DIR, REMOVE_FILE, MAKE_CHAR, MAKE_DIR, MAKE_REG = 1 << 4, 1 << 5, 1 << 6, 1 << 7, 1 << 8
MAKE_SOCK, MAKE_FIFO, MAKE_BLOCK, MAKE_SYM = 1 << 9, 1 << 10, 1 << 11, 1 << 12
REFER, TRUNCATE, IOCTL_DEV = 1 << 13, 1 << 14, 1 << 15
FS_BY_ABI = {1: (1 << 13) - 1, 2: (1 << 14) - 1, 3: (1 << 15) - 1, 4: (1 << 15) - 1, 5: (1 << 16) - 1}
FILE_RIGHTS = EXECUTE | WRITE_FILE | READ_FILE | TRUNCATE | IOCTL_DEV
READ = EXECUTE | READ_FILE | READ_DIR
NET_BIND_TCP, NET_CONNECT_TCP = 1 << 0, 1 << 1
SCOPE_ABSTRACT_UNIX_SOCKET, SCOPE_SIGNAL = 1 << 0, 1 << 1

libc = ctypes.CDLL(None, use_errno=True)
libc.syscall.restype = ctypes.c_long


class RulesetAttr(ctypes.Structure):
    _fields_ = [("handled_access_fs", ctypes.c_uint64), ("handled_access_net", ctypes.c_uint64), ("scoped", ctypes.c_uint64)]


class PathBeneathAttr(ctypes.Structure):
    _pack_ = 1
    _fields_ = [("allowed_access", ctypes.c_uint64), ("parent_fd", ctypes.c_int32)]


class NetPortAttr(ctypes.Structure):
    _fields_ = [("allowed_access", ctypes.c_uint64), ("port", ctypes.c_uint64)]


def fail(message):
    # stdout is the protocol channel: a line that is not the ready line makes the pool report it.
    sys.stdout.write(json.dumps({"fenceError": message}) + "\n")
    sys.stdout.flush()
    os._exit(70)


def check(result, what):
    if result < 0:
        fail(f"{what}: {os.strerror(ctypes.get_errno())}")
    return result


def landlock_abi():
    return libc.syscall(SYS_landlock_create_ruleset, None, ctypes.c_size_t(0), ctypes.c_uint32(LANDLOCK_CREATE_RULESET_VERSION))


def landlock(read, write, grant_read, grant_write, ports):
    abi = landlock_abi()
    if abi < 1:
        fail("Landlock is not available in this kernel; the process backend cannot fence a worker")
    fs = FS_BY_ABI.get(abi, FS_BY_ABI[5])
    attr = RulesetAttr(fs, (NET_BIND_TCP | NET_CONNECT_TCP) if abi >= 4 else 0,
                       (SCOPE_ABSTRACT_UNIX_SOCKET | SCOPE_SIGNAL) if abi >= 6 else 0)
    size = ctypes.sizeof(RulesetAttr) if abi >= 6 else (16 if abi >= 4 else 8)
    ruleset = check(libc.syscall(SYS_landlock_create_ruleset, ctypes.byref(attr), ctypes.c_size_t(size), ctypes.c_uint32(0)),
                    "landlock_create_ruleset")
    # System and runtime paths may be symlinks (/lib -> usr/lib); a granted path may not: the
    # runner checked it resolved inside what the operator allows, and a link swapped in since
    # must not widen the grant.
    for paths, rights, flags in ((read, READ & fs, 0), (write, fs, 0),
                                 (grant_read, READ & fs, os.O_NOFOLLOW), (grant_write, fs, os.O_NOFOLLOW)):
        for path in paths:
            try:
                fd = os.open(path, os.O_PATH | os.O_CLOEXEC | flags)
            except FileNotFoundError:
                continue  # a granted path that does not exist grants nothing
            if stat.S_ISLNK(os.fstat(fd).st_mode):
                os.close(fd)
                continue
            allowed = rights if stat.S_ISDIR(os.fstat(fd).st_mode) else rights & FILE_RIGHTS
            rule = PathBeneathAttr(allowed, fd)
            check(libc.syscall(SYS_landlock_add_rule, ruleset, LANDLOCK_RULE_PATH_BENEATH, ctypes.byref(rule), ctypes.c_uint32(0)),
                  f"landlock_add_rule {path}")
            os.close(fd)
    if abi >= 4:
        for port in ports:
            rule = NetPortAttr(NET_CONNECT_TCP, port)
            check(libc.syscall(SYS_landlock_add_rule, ruleset, LANDLOCK_RULE_NET_PORT, ctypes.byref(rule), ctypes.c_uint32(0)),
                  f"landlock_add_rule port {port}")
    elif ports:
        fail(f"Landlock ABI {abi} cannot limit TCP ports; refusing to grant network")
    check(libc.syscall(SYS_landlock_restrict_self, ruleset, ctypes.c_uint32(0)), "landlock_restrict_self")
    os.close(ruleset)


def keep(paths, fds):
    """Bind host files back at their own path inside the private /run."""
    for path, fd in zip(paths, fds, strict=True):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        open(path, "w").close()
        check(libc.mount(f"/proc/self/fd/{fd}".encode(), path.encode(), None, MS_BIND, None), f"bind {path}")
        check(libc.mount(None, path.encode(), None, MS_BIND | MS_REMOUNT | MS_RDONLY, None), f"make {path} read-only")


MNT_DETACH = 2
HOSTNAME = b"atrund"
# Host-wide figures and identifiers a worker has no use for, shown empty: the kernel's command
# line, the boot's id (one per machine and boot: a tracking id) and the host's load.
MASKED = ("/proc/cmdline", "/proc/loadavg", "/proc/sys/kernel/random/boot_id")


def hide_host(workdir):
    """What the host would tell a worker about itself, hidden (the namespaces are this worker's
    own, so none of it touches the host): a hostname of its own in its UTS namespace; /proc with
    hidepid=2, so PID 1 (the fence, root, whose command line on the exec path is the spec) and
    every process but the worker's own are invisible; the host-wide files in MASKED empty; and no
    other worker's directory (their tmpfs mounts, this runner's or another's under the same work
    root) in its mount table."""
    check(libc.sethostname(HOSTNAME, len(HOSTNAME)), "set the hostname")
    check(libc.mount(b"proc", b"/proc", b"proc", MS_REMOUNT | MS_NOSUID | MS_NODEV | MS_NOEXEC, b"hidepid=2"),
          "hide other processes in /proc")
    for path in MASKED:
        if os.path.exists(path):
            check(libc.mount(b"/dev/null", path.encode(), None, MS_BIND, None), f"mask {path}")
    root = os.path.dirname(os.path.normpath(workdir)) + "/"
    with open("/proc/self/mountinfo") as f:
        points = [line.split()[4].encode().decode("unicode_escape") for line in f]
    for point in sorted({p for p in points if p.startswith(root)}, key=len, reverse=True):  # the deepest first
        libc.umount2(point.encode(), MNT_DETACH)  # a mount already gone is nothing to hide: no error


def relocate(sources, fds, argv, read):
    """Show the runtime's own directories at /run/atrund/N, read-only, and point argv there.

    They may live where the worker cannot see or reach them: under /tmp (which the worker's own
    /tmp covers) or under a directory closed to other users (/root). A tmpfs on /run also hides
    the host's /run (sockets such as docker.sock) from the worker.
    """
    check(libc.mount(b"tmpfs", b"/run", b"tmpfs", MS_NOSUID | MS_NODEV, b"size=64k,mode=0755"), "mount a tmpfs on /run")
    moves = relocation(sources)
    for (src, dst), fd in zip(moves, fds, strict=True):
        if stat.S_ISDIR(os.fstat(fd).st_mode):
            os.makedirs(dst)
        else:
            os.makedirs(os.path.dirname(dst), exist_ok=True)
            open(dst, "w").close()
        check(libc.mount(f"/proc/self/fd/{fd}".encode(), dst.encode(), None, MS_BIND | MS_REC, None), f"bind {src}")
        check(libc.mount(None, dst.encode(), None, MS_BIND | MS_REMOUNT | MS_RDONLY, None), f"make {src} read-only")
    return [moved(word, moves) for word in argv], [moved(p, moves) for p in read] + [dst for _, dst in moves]


def relocation(sources):
    """Where relocate() shows each source: (source, /run/atrund/N), in the order given."""
    return [(src, f"/run/atrund/{i}") for i, src in enumerate(sources)]


def moved(path, moves):
    """``path`` as the worker sees it once ``moves`` are mounted (the longest source wins)."""
    for src, dst in sorted(moves, key=lambda m: len(m[0]), reverse=True):
        if path == src or path.startswith(src + "/"):
            return dst + path[len(src):]
    return path


# seccomp. With an allowlist (a runtime directory's ``syscalls`` file, the default since issue
# 15), every system call outside it answers EPERM: the list is what the runtime (its at-run-exec,
# the interpreter, and the bundles of its tests) was traced calling (scripts/seccomp-trace).
# Whatever the list says, the calls below keep their own answers: DENIED_SYSCALLS and user
# namespaces are what an escape often needs and no bundle does; Landlock cannot see pathname
# UNIX sockets (outside /run and /tmp, e.g. a database's) or user namespaces (which hand out
# capabilities inside them). clone3 answers ENOSYS so libc falls back to clone, whose flags
# (unlike clone3's) a filter can read. socket() takes only the families in SOCKET_FAMILIES (no
# AF_UNIX, AF_VSOCK, AF_PACKET...), socketpair() only stream pairs: a datagram pair's sendto()
# names any pathname socket on the host. Without a list (a runtime without ``syscalls``), the
# filter is the denylist alone: everything else is allowed.
SCMP_ACT_ALLOW = 0x7FFF0000
SCMP_CMP_EQ, SCMP_CMP_MASKED_EQ = 4, 7
AF_UNIX, AF_INET, AF_INET6, AF_NETLINK, CLONE_NEWUSER = 1, 2, 10, 16, 0x10000000
NAMESPACE_FLAGS = 0x7E020000  # CLONE_NEWNS, NEWCGROUP, NEWUTS, NEWIPC, NEWUSER, NEWPID, NEWNET (moby's mask too)
SOCK_TYPE_MASK, SOCK_STREAM = 0xF, 1
SOCKET_FAMILIES = (AF_INET, AF_INET6, AF_NETLINK)  # netlink: glibc's getaddrinfo asks the kernel for the host's addresses
EPERM, EACCES, ENOSYS = 1, 13, 38
DENIED_SYSCALLS = (
    "ptrace", "process_vm_readv", "process_vm_writev", "bpf", "perf_event_open", "userfaultfd",
    "keyctl", "add_key", "request_key", "mount", "umount2", "pivot_root", "setns", "move_mount",
    "open_tree", "fsopen", "fsmount", "fspick", "open_by_handle_at", "name_to_handle_at", "kexec_load",
    "kexec_file_load", "init_module", "finit_module", "delete_module", "acct", "swapon", "swapoff",
    "reboot", "syslog",
)
NOT_IMPLEMENTED = ("clone3", "io_uring_setup", "io_uring_enter", "io_uring_register")
ARGUMENT_RULES = ("socket", "socketpair", "clone", "unshare")  # allowed only with the arguments above


class ArgCmp(ctypes.Structure):
    _fields_ = [("arg", ctypes.c_uint), ("op", ctypes.c_int), ("datum_a", ctypes.c_uint64), ("datum_b", ctypes.c_uint64)]


_seccomp = {}  # the filter as BPF per allowlist (None: the denylist), once built: the fork server builds each once
PR_SET_SECCOMP, SECCOMP_MODE_FILTER = 22, 2


class SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_char_p)]


def seccomp_filter(allowed=None):
    """Load the filter of ``allowed`` (no_new_privs is already set). Without libseccomp it is
    skipped: the namespaces, uid and Landlock still stand, and `atrund doctor` says so."""
    program = seccomp_rules(allowed)
    if program is None:
        return False
    prog = SockFprog(len(program) // 8, program)  # struct sock_filter is 8 bytes
    check(libc.prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, ctypes.byref(prog), 0, 0), "load the seccomp filter")
    return True


def seccomp_plan(allowed=None):
    """The filter as data, the one description both backends enforce (libseccomp compiles it
    here; the container backend hands it to the engine as a profile, container/seccomp.py).
    ``allowed``: the system calls allowed (the rest answer EPERM), or None for the denylist
    alone. Returns (default, rules): default is None (allow) or the errno every call no rule
    names answers; each rule is (name, errno or None for allow, ((arg, op, datum_a, datum_b), ...)),
    its comparisons all holding for it to apply (as libseccomp ANDs a rule's comparisons)."""
    rules = []
    if allowed is None:
        rules += [(name, EPERM, ()) for name in DENIED_SYSCALLS]
        rules.append(("socket", EACCES, ((0, SCMP_CMP_EQ, AF_UNIX, 0),)))
        rules += [(name, EPERM, ((0, SCMP_CMP_MASKED_EQ, CLONE_NEWUSER, CLONE_NEWUSER),)) for name in ("unshare", "clone")]
    else:
        allowed = set(allowed)
        rules += [(name, None, ()) for name in sorted(allowed - set(DENIED_SYSCALLS) - set(NOT_IMPLEMENTED) - set(ARGUMENT_RULES))]
        if "socket" in allowed:
            rules.append(("socket", EACCES, ((0, SCMP_CMP_EQ, AF_UNIX, 0),)))  # as without a list: EACCES, as before
            rules += [("socket", None, ((0, SCMP_CMP_EQ, family, 0),)) for family in SOCKET_FAMILIES]
        if "socketpair" in allowed:
            rules.append(("socketpair", None, ((1, SCMP_CMP_MASKED_EQ, SOCK_TYPE_MASK, SOCK_STREAM),)))
        # No new namespace of any kind: only a user namespace would work without capabilities, but
        # the kernel judges the others after copying the caller, and no runtime makes one.
        rules += [(name, None, ((0, SCMP_CMP_MASKED_EQ, NAMESPACE_FLAGS, 0),)) for name in ("clone", "unshare") if name in allowed]
    rules += [(name, ENOSYS, ()) for name in NOT_IMPLEMENTED]
    return (None if allowed is None else EPERM), rules


def seccomp_rules(allowed=None):
    """The filter compiled to BPF by libseccomp, once per process and allowlist (None without
    libseccomp); loading it is per worker. ``allowed``: as seccomp_plan's."""
    key = None if allowed is None else tuple(sorted(set(allowed)))
    if key in _seccomp:
        return _seccomp[key]
    try:
        lib = ctypes.CDLL("libseccomp.so.2", use_errno=True)
    except OSError:
        return None
    lib.seccomp_init.restype = ctypes.c_void_p
    lib.seccomp_rule_add_array.argtypes = [ctypes.c_void_p, ctypes.c_uint32, ctypes.c_int, ctypes.c_uint, ctypes.POINTER(ArgCmp)]
    lib.seccomp_export_bpf.argtypes = [ctypes.c_void_p, ctypes.c_int]
    lib.seccomp_release.argtypes = [ctypes.c_void_p]
    action = lambda e: SCMP_ACT_ALLOW if e is None else 0x00050000 | e  # noqa: E731 - SCMP_ACT_ERRNO(e)
    default, rules = seccomp_plan(key)
    ctx = lib.seccomp_init(action(default))
    if not ctx:
        fail("seccomp_init failed")
    for name, answer, cmps in rules:
        nr = lib.seccomp_syscall_resolve_name(name.encode())
        if nr < 0:
            continue  # not a syscall on this architecture
        arr = (ArgCmp * max(1, len(cmps)))(*(ArgCmp(*c) for c in cmps))
        if lib.seccomp_rule_add_array(ctypes.c_void_p(ctx), ctypes.c_uint32(action(answer)), nr, len(cmps), arr) != 0:
            fail(f"seccomp rule for {name} failed")
    read, write = os.pipe()  # the program is a few kilobytes: a pipe holds it whole
    try:
        if lib.seccomp_export_bpf(ctypes.c_void_p(ctx), write) != 0:
            fail("seccomp_export_bpf failed")
        os.close(write)
        write = -1
        program = b""
        while chunk := os.read(read, 65536):
            program += chunk
    finally:
        os.close(read)
        if write >= 0:
            os.close(write)
    lib.seccomp_release(ctypes.c_void_p(ctx))
    _seccomp[key] = program
    return program


def join_network(fd):
    """Leave the network namespace ``unshare`` left us in (the host's) for the one the runner
    made for this worker, whose only way out is its egress proxy; first, as root."""
    check(libc.setns(fd, CLONE_NEWNET), "join the worker's network namespace")
    os.close(fd)


def main():
    """The exec path: ``unshare`` made the namespaces and this process is their init."""
    spec = json.loads(sys.argv[1])
    if spec.get("netns") is not None:
        join_network(spec["netns"])
    argv = enter(spec)
    child = os.fork()
    if child == 0:
        seccomp_filter(spec.get("syscalls"))  # in the runtime's process only: the init needs none of this either way
        os.execve(argv[0], argv, spec["env"])
    serve_as_init(child)


def enter(spec, parent_alive=lambda: True):
    """Steps 1 to 4 of the fence, in this process (the namespace's future init), in this order.
    Returns the runtime's command with its directories relocated. Shared by the exec path
    (main) and the fork server (forkserver.py): one fence. ``parent_alive`` says whether the
    process that would kill this one is still there (see the parent-death signal below)."""
    uid, gid, workdir = spec["uid"], spec["gid"], spec["workdir"]
    for procs in spec.get("cgroups", []):  # join first: everything started from here on is counted
        with open(procs, "w") as f:
            f.write("0")
    check(libc.mount(None, b"/", None, MS_REC | MS_PRIVATE, None), "make mounts private")
    # Open what we will show before anything is covered (the worker dir may live under /run).
    fds = [os.open(src, os.O_PATH | os.O_CLOEXEC) for src in spec["relocate"]]
    kept = [os.open(path, os.O_PATH | os.O_CLOEXEC) for path in spec["keep"]]
    work = os.open(workdir, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    # The worker's alone; under an unprivileged runner (``share_gid``: its group) also the
    # runner's, which copies each request's bundle in and cannot pass a 0700 directory of another uid.
    os.fchown(work, uid, spec.get("share_gid", gid))
    os.fchmod(work, 0o770 if "share_gid" in spec else 0o700)
    check(libc.mount(f"/proc/self/fd/{work}".encode(), b"/tmp", None, MS_BIND, None), "bind the worker directory on /tmp")
    os.close(work)
    hide_host(workdir)  # before relocate() covers /run, where the other workers' directories may be
    argv, read = relocate(spec["relocate"], fds, spec["argv"], spec["read"])
    keep(spec["keep"], kept)
    for fd in fds + kept:
        os.close(fd)
    for name, value in spec["rlimits"].items():
        resource.setrlimit(getattr(resource, f"RLIMIT_{name}"), (value, value))
    check(libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "no_new_privs")
    os.setgroups([])
    os.setresgid(gid, gid, gid)
    os.setresuid(uid, uid, uid)
    # The kernel clears the parent-death signal when the uid changes, so it is set (again) here:
    # the worker dies with whatever started it (unshare, or the fork server), hence with the runner.
    check(libc.prctl(PR_SET_PDEATHSIG, SIGKILL, 0, 0, 0), "parent-death signal")
    if not parent_alive():
        os._exit(1)  # it died before the line above: nothing would kill this worker
    landlock(read, ["/tmp", *spec["write"]], spec["grant_read"], spec["grant_write"], spec["ports"])
    os.chdir("/tmp")
    return argv


def serve_as_init(child):
    """Be PID 1 of the worker's namespace so the runtime is not.

    The kernel shields a namespace's init from its own signals (a runtime that is PID 1
    cannot even SIGKILL itself) and expects it to reap orphans. This loop reaps everything,
    and when the runtime exits, exits with its status, which tears the namespace down.
    """
    devnull = os.open("/dev/null", os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(devnull, fd)  # the pipes belong to the runtime alone: EOF when it is done
    while True:
        pid, status = os.wait()
        if pid == child:
            os._exit(os.waitstatus_to_exitcode(status) if os.WIFEXITED(status) else 128 + os.WTERMSIG(status))


if __name__ == "__main__":
    main()
