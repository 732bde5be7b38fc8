"""An operator's everyday loop (issue 17): live [access] and [permissions], check-config's
warnings, a busy port in one line, start and stop lines in the log. `atrund serve` as a real
subprocess against the local stack."""

import json
import signal
import socket
import time

from conftest import atrund, serve_config, serve_subprocess, wait_result

from atrund.errors import ConfigError


def _log_has(log, text: str, timeout: float = 20) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if text in log.read_text():
            return True
        time.sleep(0.1)
    return False


async def test_access_and_permissions_reload_while_serving(stack, author, login_author, reader, tmp_path):
    """A bundle asking for a host is rejected, then runs once [permissions] grants it (file
    edited); a second author is served once [access] names them by handle (SIGHUP)."""
    other = await login_author("other")
    runner = stack.create_account(f"live{time.monotonic_ns() % 100000}")
    config = serve_config(tmp_path, stack, runner, author)
    log = tmp_path / "serve.log"
    serve = serve_subprocess(config, log)
    try:
        assert _log_has(log, "runner published"), log.read_text()
        code = "def main(args):\n    return 'ran'\n"
        asks = await author.publish(code, permissions={"net": ["api.example.com"]})
        first = await wait_result(reader, runner.did, await author.invoke(asks, runner.did))
        assert first["status"] == "rejected" and "api.example.com" in first["error"], first
        config.write_text(config.read_text() + '[permissions]\nnet = ["api.example.com"]\n')
        assert _log_has(log, '"applied": ["permissions"]'), log.read_text()
        second = await wait_result(reader, runner.did, await author.invoke(asks, runner.did))
        assert second["status"] == "success", second

        plain = await other.publish(code)
        text = config.read_text().replace(f'allowlist = ["{author.account.did}"]',
                                          f'allowlist = ["{author.account.did}", "{other.account.handle}"]')
        config.write_text(text)
        serve.send_signal(signal.SIGHUP)
        assert _log_has(log, '"applied": ["access"]'), log.read_text()
        served = await wait_result(reader, runner.did, await other.invoke(plain, runner.did), timeout=60)
        assert served["status"] == "success", served
    finally:
        serve.send_signal(signal.SIGTERM)
        assert serve.wait(30) == 0, log.read_text()
    lines = [json.loads(line) for line in log.read_text().splitlines() if line.startswith("{")]
    events = [line.get("event") for line in lines]
    assert events[0] == "starting" and "signal received: stopping" in events and events[-1] == "stopped", events


def test_check_config_refuses_no_scheme_and_warns(tmp_path, monkeypatch):
    cfg = tmp_path / "c.toml"
    cfg.write_text('[runner]\npds = "pds.example.com"\nidentifier = "r.test"\n')
    p = atrund("check-config", "-c", str(cfg))
    assert p.returncode == ConfigError.exit_code and "runner.pds" in p.stderr and "https://pds.example.com" in p.stderr
    assert len(p.stderr.strip().splitlines()) == 1, p.stderr  # one line, not a traceback
    cfg.write_text('[runner]\npds = "https://pds.example.com"\nidentifier = "r.test"\npassword_env = "NO_SUCH_PW_VAR"\n'
                   f'[state]\ndir = "{tmp_path / "state"}"\n')
    p = atrund("check-config", "-c", str(cfg), env={"NO_SUCH_PW_VAR": ""})
    assert p.returncode == 0, p.stderr
    assert "warning: runner.password_env: environment variable NO_SUCH_PW_VAR is empty or unset" in p.stderr
    assert "warning: access.allowlist is empty" in p.stderr and "serves nobody" in p.stderr


def test_a_busy_gateway_port_is_one_line(stack, new_account, tmp_path):
    """`serve` with gateway.listen on a port another process holds: one line, exit 11."""
    runner = new_account("busy")
    (tmp_path / "pw").write_text(runner.app_password)
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        cfg = tmp_path / "c.toml"
        cfg.write_text(f'[runner]\npds = "{stack.pds_url}"\nidentifier = "{runner.handle}"\npassword_file = "pw"\n'
                       f'{stack.identity_toml()}[executor]\nisolation = "none"\nwarm = 0\n'
                       f'[gateway]\nlisten = "127.0.0.1:{port}"\n')
        p = atrund("serve", "-c", str(cfg), "--json-logs", timeout=60)
    errors = [line for line in p.stderr.splitlines() if line.startswith("error:")]
    assert p.returncode == ConfigError.exit_code and "Traceback" not in p.stderr, p.stderr
    assert errors == [f"error: gateway.listen 127.0.0.1:{port}: cannot listen there: Address already in use "
                      f"({ConfigError.fix})"], p.stderr


def test_a_state_database_another_program_holds_is_one_line(tmp_path):
    """A sqlite3 shell (or a backup) holding the state file's lock: an operator command says so
    in one line (StoreError, exit 15), no traceback; once it lets go, the command works."""
    import sqlite3

    from atrund.errors import StoreError
    from atrund.state import State

    state = tmp_path / "state"
    State(state / "atrund.sqlite3").close()
    cfg = tmp_path / "c.toml"
    cfg.write_text('[runner]\npds = "https://pds.example.com"\nidentifier = "r.test"\n'
                   f'[state]\ndir = "{state}"\n')
    shell = sqlite3.connect(state / "atrund.sqlite3", isolation_level=None)
    shell.execute("BEGIN EXCLUSIVE")
    try:
        p = atrund("state", "list", "-c", str(cfg), "--author", "did:plc:abc", "--bundle", "b")
    finally:
        shell.execute("ROLLBACK")
        shell.close()
    assert p.returncode == StoreError.exit_code and "Traceback" not in p.stderr, p.stderr
    assert len(p.stderr.strip().splitlines()) == 1 and "holds it" in p.stderr, p.stderr
    again = atrund("state", "list", "-c", str(cfg), "--author", "did:plc:abc", "--bundle", "b")
    assert again.returncode == 0, again.stderr
