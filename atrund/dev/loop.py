"""`atrund dev FILE`: an author's local loop, like `wrangler dev`.

Starts the local AT Protocol stack (atrund.dev.stack: the reference PDS and PLC on loopback) and
a runner on it (atrund.app, firehose ingest, its gateway on loopback), publishes FILE as a
bundle of a fresh local author, and then, until Ctrl-C:

- re-publishes FILE each time it is saved, under the same record key (so the same AT URI and
  gateway URL), after the same checks `bundle publish` makes (a file that does not parse is
  reported and not published);
- prints each result as it lands in the runner's repo (from `atrund invoke` against it, or the
  gateway).

Everything lives in a temporary directory and goes when it stops. What it prints includes the
environment for `atrund invoke` and `atrund call` to reach it from another shell.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from atrund import client, config
from atrund.app import App
from atrund.dev.stack import LocalStack
from atrund.errors import AtrundError

CHECK_SECONDS = 0.3  # how often FILE is looked at for a save


def _stamp(path: Path) -> tuple[int, int] | None:
    try:
        st = path.stat()
    except FileNotFoundError:
        return None
    return st.st_mtime_ns, st.st_size


async def run(file: Path, runtime: str, say: Callable[[str], None], port: int = 0, isolation: str = "process",
              ready: Callable[[dict[str, Any]], None] | None = None, stop: asyncio.Event | None = None) -> None:
    """The loop; ``say`` prints a line for people, ``ready`` gets what was set up (URLs, the
    author's environment) once FILE is first published; returns when ``stop`` is set."""
    started = time.monotonic()
    stop = stop or asyncio.Event()
    with tempfile.TemporaryDirectory(prefix="atrund-dev-") as tmp, LocalStack(data_dir=Path(tmp) / "stack") as stack:
        author, runner = stack.create_account("author"), stack.create_account("runner")
        (Path(tmp) / "pw").write_text(runner.app_password)
        cfg = config.parse({
            "runner": {"pds": stack.pds_url, "identifier": runner.handle, "password_file": str(Path(tmp) / "pw"),
                       "description": "atrund dev"},
            "identity": stack.identity,
            "access": {"allowlist": [author.did]},
            "ingest": {"mode": "firehose"},
            "executor": {"isolation": isolation, "warm": 1},
            "gateway": {"listen": f"127.0.0.1:{port}", "latest_cache_seconds": 0},
            "state": {"dir": str(Path(tmp) / "state")},
        })
        app = App(cfg)
        await app.start()
        serving = asyncio.create_task(app.run(stop))
        try:
            async with client.reader(stack.plc_url) as repos:
                session = await client.login(repos, author.handle, author.app_password, stack.pds_url)
                try:
                    await _loop(file, runtime, say, ready, stop, session, repos, app, stack, author, runner, started)
                finally:
                    await session.close()
        finally:
            stop.set()
            await serving
            await app.close()


async def _loop(file, runtime, say, ready, stop, session, repos, app, stack, author, runner, started) -> None:
    endpoints = client.check_file(file, runtime, None)
    published = await client.publish(session, repos, file.read_bytes(), runtime, mime=client.code_mime(file),
                                     name=file.name, endpoints=endpoints)
    rkey = published.uri.rsplit("/", 1)[1]
    url = f"{app.gateway.url}/{author.handle}/{rkey}/" if app.gateway else None
    info = {"bundle": published.uri, "cid": published.cid, "gateway": url, "runner": runner.did,
            "env": {"ATRUND_PDS": stack.pds_url, "ATRUND_PLC_URL": stack.plc_url, "ATRUND_IDENTIFIER": author.handle,
                    "ATRUND_PASSWORD": author.app_password},
            "endpoints": endpoints, "readySeconds": round(time.monotonic() - started, 2)}
    say(f"ready in {info['readySeconds']} s: {file.name} is {published.uri}")
    if url and endpoints and "handleRequest" in endpoints:
        say(f"  gateway  {url}")
    say("  from another shell:")
    say("    " + " ".join(f"{k}={v}" for k, v in info["env"].items()) + " \\")
    say(f"    atrund invoke {published.uri} --runner {runner.did} --endpoint {(endpoints or ['main'])[0]} --wait")
    say(f"  watching {file} for saves; Ctrl-C stops")
    if ready is not None:
        ready(info)
    watcher = asyncio.create_task(_print_results(repos, runner.did, say))
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
        watcher.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await watcher


async def _print_results(repos, runner_did: str, say: Callable[[str], None]) -> None:
    async for found in client.watch_results(repos, runner_did, interval=0.3):
        said = found.get("error") or json.dumps(found.get("value"), ensure_ascii=False)
        say(f"result {found['status']}: {said}  ({found['uri']})")
