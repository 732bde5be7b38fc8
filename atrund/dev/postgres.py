"""A throwaway Postgres for tests and benchmarks: ``initdb`` and ``pg_ctl`` into a temporary
directory, listening on a free loopback port (and on one more address if asked), stopped and
removed on exit.

Debian's ``postgresql`` package puts the server in /usr/lib/postgresql/<version>/bin (not on
PATH); ``scripts/setup`` installs it where it is missing. initdb refuses to run as root, so under
root the cluster belongs to the ``postgres`` user the package creates (or ``nobody``), and its
directory is made outside the caller's private temporary directories, which that user could not
enter. ``fsync`` is off (the tests check transactions and crashes of processes, not power cuts:
a commit is in the kernel's cache when it returns); ``synchronous_commit`` stays on, or a commit
could be lost when the tests kill the server.
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

from atrund.dev.stack import _free_ports
from atrund.errors import LocalStackError

USER = "atrund"  # the cluster's superuser; trust authentication on loopback only


def server_bin() -> Path | None:
    """The newest installed server's bin directory, or None."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(Path(p).parent.parent.name))
    if found:
        return Path(found[-1]).parent
    initdb = shutil.which("initdb")
    return Path(initdb).parent if initdb else None


def _owner() -> pwd.struct_passwd | None:
    """Whom the server runs as: None (this process) unless this is root."""
    if os.geteuid() != 0:
        return None
    for name in ("postgres", "nobody"):
        try:
            return pwd.getpwnam(name)
        except KeyError:
            continue
    raise LocalStackError("running as root and neither the postgres nor the nobody user exists to run Postgres as")


class LocalPostgres:
    """``with LocalPostgres() as pg: pg.url`` (the ``postgres`` database; ``pg.create(name)`` makes more)."""

    def __init__(self, also_listen: str | None = None, trusted: str | None = None) -> None:
        """``also_listen``: an address to listen on beside 127.0.0.1 (the tests' hosts reach it
        over a bridge: tests/netns.py); ``trusted``: a network (CIDR) whose clients are let in
        without a password, as loopback's are."""
        self.also_listen, self.trusted = also_listen, trusted
        self.bin = server_bin()
        if self.bin is None:
            raise LocalStackError("Postgres is not installed (Debian: apt-get install postgresql; scripts/setup does)")
        self.owner = _owner()
        self.dir: Path | None = None
        self.port = 0

    def url_of(self, database: str) -> str:
        return f"postgresql://{USER}@127.0.0.1:{self.port}/{database}"

    @property
    def url(self) -> str:
        return self.url_of("postgres")

    def _run(self, *args: str, timeout: float = 60) -> None:
        owner = self.owner
        done = subprocess.run(args, capture_output=True, text=True, timeout=timeout, cwd="/",
                              user=owner.pw_uid if owner else None, group=owner.pw_gid if owner else None,
                              extra_groups=[] if owner else None)
        if done.returncode != 0:
            raise LocalStackError(f"{Path(args[0]).name} failed ({done.returncode}): {(done.stderr or done.stdout).strip()[-800:]}")

    def start(self) -> "LocalPostgres":
        self.dir = Path(tempfile.mkdtemp(prefix="atrund-pg-"))
        if self.owner is not None:
            os.chown(self.dir, self.owner.pw_uid, self.owner.pw_gid)
        data = self.dir / "data"
        self._run(str(self.bin / "initdb"), "-D", str(data), "-U", USER, "--auth=trust", "-E", "UTF8",
                  "--locale=C.UTF-8", "--no-sync")
        if self.trusted:
            with open(data / "pg_hba.conf", "a") as hba:
                hba.write(f"host all all {self.trusted} trust\n")
        (self.port,) = _free_ports(1)
        self._pg_ctl("start")
        return self

    def _pg_ctl(self, action: str, mode: str = "immediate") -> None:
        if action == "start":
            listen = ",".join(["127.0.0.1", *([self.also_listen] if self.also_listen else [])])
            options = (f"-p {self.port} -k {self.dir} -c listen_addresses={listen} -c fsync=off "
                       "-c full_page_writes=off -c max_connections=200")
            args = ("-l", str(self.dir / "log"), "-o", options, "-t", "60", "start")
        else:  # immediate by default, as a crash would: nothing here needs a clean shutdown
            args = ("-m", mode, "stop")
        self._run(str(self.bin / "pg_ctl"), "-D", str(self.dir / "data"), "-w", *args)

    def stop(self) -> None:
        if self.dir is None:
            return
        try:
            self._pg_ctl("stop")
        except LocalStackError:
            pass  # not running (it never started, or it was killed): the directory goes anyway
        shutil.rmtree(self.dir, ignore_errors=True)
        self.dir = None

    def restart(self, mode: str = "immediate", down: float = 0.0) -> None:
        """Stop the server (``mode``: pg_ctl's immediate, as a crash would; fast: sessions are
        ended and the server shuts down cleanly), leave it down ``down`` seconds, and start it
        again on the same port."""
        self._pg_ctl("stop", mode)
        time.sleep(down)
        self._pg_ctl("start")

    def create(self, database: str) -> str:
        """A new, empty database; its URL."""
        import psycopg

        with psycopg.connect(self.url, autocommit=True) as db:
            db.execute(f'CREATE DATABASE "{database}"')
        return self.url_of(database)

    def __enter__(self) -> "LocalPostgres":
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    def __exit__(self, *exc) -> None:
        self.stop()
