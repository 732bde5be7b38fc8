"""`atrund dev FILE`: an author's local loop, like `wrangler dev`.

Starts the local AT Protocol stack (atrund.dev.stack: the reference PDS and PLC on loopback) and
a runner on it (atrund.app, firehose ingest, its gateway on loopback), publishes FILE as a
bundle of a fresh local author, and then, until Ctrl-C:

- re-publishes FILE each time it is saved, under the same record key (so the same AT URI and
  gateway URL), after the same checks `bundle publish` makes (a file that does not parse is
  reported and not published);
- prints each result as it lands in the runner's repo (from `atrund invoke` against it), and
  what each run printed (`atrund tail`'s view, read from the runner in-process), gateway
  requests' failures included.

With ``-c CONFIG`` it runs on a real PDS instead: the runner account of that configuration (one
meant for development: its runner record is published with the loopback gateway URL) and the
author `atrund login` kept. Everything lives in a temporary directory and goes when it stops. What it prints includes the
environment for `atrund invoke` and `atrund call` to reach it from another shell.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from atrund import client, config
from atrund.app import App
from atrund.dev.stack import LocalStack
from atrund.errors import AtrundError, NoSession

CHECK_SECONDS = 0.3  # how often FILE is looked at for a save


def _stamp(path: Path) -> tuple[int, int] | None:
    try:
        st = path.stat()
    except FileNotFoundError:
        return None
    return st.st_mtime_ns, st.st_size


@dataclass
class _Setup:
    """Where the loop runs: the runner's configuration, the author's login, and the environment
    another shell needs to reach them."""

    cfg: config.Config
    plc_url: str
    login: Callable[[Any], Awaitable[Any]]  # repos -> the author's Session
    env: dict[str, str]


def _local(stack: LocalStack, tmp: Path, isolation: str, port: int) -> _Setup:
    """A fresh author and runner on the local stack."""
    author, runner = stack.create_account("author"), stack.create_account("runner")
    (tmp / "pw").write_text(runner.app_password)
    cfg = config.parse({
        "runner": {"pds": stack.pds_url, "identifier": runner.handle, "password_file": str(tmp / "pw"),
                   "description": "atrund dev"},
        "identity": stack.identity,
        "access": {"allowlist": [author.did]},
        "ingest": {"mode": "firehose"},
        "executor": {"isolation": isolation, "warm": 1},
        "gateway": {"listen": f"127.0.0.1:{port}", "latest_cache_seconds": 0},
        "state": {"dir": str(tmp / "state")},
    })
    return _Setup(cfg, stack.plc_url, lambda repos: client.login(repos, author.handle, author.app_password, stack.pds_url),
                  {"ATRUND_PDS": stack.pds_url, "ATRUND_PLC_URL": stack.plc_url, "ATRUND_IDENTIFIER": author.handle,
                   "ATRUND_PASSWORD": author.app_password})


def _configured(path: Path, tmp: Path, port: int) -> _Setup:
    """The runner account of the configuration at ``path`` (meant for development: its runner
    record is published with a loopback gateway URL), on its PDS, with state in ``tmp``, a
    loopback gateway and firehose ingest; the author is the one `atrund login` kept, added to
    the allowlist."""
    data = config.read(path)
    kept = client.kept_session()
    if kept is None:
        raise NoSession(f"atrund dev -c {path} runs as the author `atrund login` kept, and there is none")
    access = {**data.get("access", {}), "mode": "allowlist"}
    access["allowlist"] = [*access.get("allowlist", []), kept["did"]]
    gateway = {**data.get("gateway", {}), "enabled": True, "listen": f"127.0.0.1:{port}", "latest_cache_seconds": 0}
    gateway.pop("public_url", None)  # the loopback URL is the one to publish
    data.update(access=access, ingest={**data.get("ingest", {}), "mode": "firehose"}, gateway=gateway,
                state={"dir": str(tmp / "state")})
    cfg = config.parse(data, base_dir=path.resolve().parent)
    return _Setup(cfg, str(cfg.identity.plc_url), lambda repos: client.resume(kept["did"]),
                  {"ATRUND_PLC_URL": str(cfg.identity.plc_url)})


async def run(file: Path, runtime: str, say: Callable[[str], None], port: int = 0, isolation: str = "process",
              ready: Callable[[dict[str, Any]], None] | None = None, stop: asyncio.Event | None = None,
              config_path: Path | None = None) -> None:
    """The loop; ``say`` prints a line for people, ``ready`` gets what was set up (URLs, the
    author's environment) once FILE is first published; returns when ``stop`` is set. With
    ``config_path``, on that runner configuration's PDS instead of a local stack."""
    started = time.monotonic()
    stop = stop or asyncio.Event()
    with tempfile.TemporaryDirectory(prefix="atrund-dev-") as tmp, contextlib.ExitStack() as held:
        if config_path is None:
            setup = _local(held.enter_context(LocalStack(data_dir=Path(tmp) / "stack")), Path(tmp), isolation, port)
        else:
            setup = _configured(config_path, Path(tmp), port)
        app = App(setup.cfg)
        await app.start()
        serving = asyncio.create_task(app.run(stop))
        try:
            async with client.reader(setup.plc_url) as repos:
                session = await setup.login(repos)
                try:
                    await _loop(file, runtime, say, ready, stop, session, repos, app, setup, started)
                finally:
                    await session.close()
        finally:
            stop.set()
            await serving
            await app.close()


async def _loop(file, runtime, say, ready, stop, session, repos, app, setup: _Setup, started) -> None:
    endpoints = client.check_file(file, runtime, None)
    published = await client.publish(session, repos, file.read_bytes(), runtime, mime=client.code_mime(file),
                                     name=file.name, endpoints=endpoints)
    rkey = published.uri.rsplit("/", 1)[1]
    url = f"{app.gateway.url}/{session.handle or session.did}/{rkey}/" if app.gateway else None
    runner_did = app.session.did
    info = {"bundle": published.uri, "cid": published.cid, "gateway": url, "runner": runner_did, "env": setup.env,
            "endpoints": endpoints, "readySeconds": round(time.monotonic() - started, 2)}
    say(f"ready in {info['readySeconds']} s: {file.name} is {published.uri}")
    if url and endpoints and "handleRequest" in endpoints:
        say(f"  gateway  {url}")
    say("  from another shell:")
    say("    " + " ".join(f"{k}={v}" for k, v in info["env"].items()) + " \\")
    say(f"    atrund invoke {published.uri} --runner {runner_did} --endpoint {(endpoints or ['main'])[0]} --wait")
    say(f"  watching {file} for saves; Ctrl-C stops")
    if ready is not None:
        ready(info)
    watchers = [asyncio.create_task(_print_results(repos, runner_did, say)),
                asyncio.create_task(_print_output(app, session.did, published.uri, say))]
    try:
        stamp = _stamp(file)
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), CHECK_SECONDS)
            now = _stamp(file)
            if now == stamp or now is None:
                continue
            stamp = now
            try:
                declared = client.check_file(file, runtime, None)
                again = await client.update(session, repos, published.uri, file.read_bytes(), mime=client.code_mime(file),
                                            endpoints=declared)
            except AtrundError as e:
                say(f"not re-published: {e}")
                continue
            say(f"re-published {file.name}: cid {again.cid} (same URI, same gateway URL)")
    finally:
        for watcher in watchers:
            watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watcher


async def _print_results(repos, runner_did: str, say: Callable[[str], None]) -> None:
    async for found in client.watch_results(repos, runner_did, interval=0.3):
        said = found.get("error") or json.dumps(found.get("value"), ensure_ascii=False)
        say(f"result {found['status']}: {said}  ({found['uri']})")


async def _print_output(app: App, author: str, bundle: str, say: Callable[[str], None]) -> None:
    """What the bundle printed, run by run, as the runner keeps it (atrund.logbook)."""
    after = 0
    while True:
        await asyncio.sleep(CHECK_SECONDS)
        for entry in app.logbook.read(author, bundle=bundle, after=after, limit=100) if app.logbook else []:
            after = entry.seq or after
            if entry.kind in ("http", "xrpc") and entry.status != "success":
                say(f"{entry.kind} request {entry.id} {entry.status}: {entry.error}")
            for line in (entry.output or "").splitlines():
                say(f"  | {line}")
