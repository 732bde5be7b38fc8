"""The demo: the whole path on a local AT Protocol stack, narrated.

Starts the reference PDS + PLC on loopback, creates an author and a runner account, starts
`atrund serve` for the runner, then runs the same CLI commands an author would type: publish
the bundles in examples/, invoke them, wait for each result record, and print where each
result lives and what it says. Run it with `bash scripts/demo`.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

from rich.console import Console
from rich.table import Table

from atrund import client
from atrund.config import RUNTIMES_DIR
from atrund.dev.stack import LocalStack
from atrund.errors import AtrundError
from atrund.execute.runtimes import declared
from atrund.records import RUNNER, firing_key, now_iso, tick_key

ROOT = Path(__file__).resolve().parents[2]
console = Console(highlight=False, width=max(Console().width, 120), soft_wrap=True)  # URIs stay whole

INVOCATIONS = [
    ("hello.py", "greet", {"name": "Ada"}),
    ("hello.py", "divide", {"a": 84, "b": 2}),
    ("hello.py", "divide", {"a": 1, "b": 0}),  # fails on purpose: ZeroDivisionError
    ("wordstats.py", "stats", {"text": "the quick brown fox jumps over the lazy dog the end"}),
    ("hello.ts", "greet", {"name": "Grace"}),
    ("hello.mjs", "greet", {"name": "Linus"}),
    ("signed.py", "sign", {"message": "hello"}),  # its key arrives as a sealed secret
    ("counter.py", "hit", {"name": "ada"}),  # durable state (ctx.state): 1, 2, 3 across runs
    ("counter.py", "hit", {"name": "grace"}),
    ("counter.py", "hit", {"name": "ada"}),
]
SIGNING_KEY = "demo-signing-key-0123456789"  # sealed to the runner by `bundle publish --secret`
RUNTIME = {extension: name for name, extension in declared(RUNTIMES_DIR).items()}  # by file extension


def atrund(args: list[str], env: dict[str, str]) -> tuple[int, dict]:
    shown = " ".join(a if " " not in a and "{" not in a else f"'{a}'" for a in args)
    console.print(f"[dim]$[/dim] [bold]atrund {shown}[/bold]")
    proc = subprocess.run([sys.executable, "-m", "atrund.cli", *args], env=env, capture_output=True, text=True)
    if proc.returncode not in (0, 3):
        console.print(proc.stderr)
        raise SystemExit(f"atrund {args[0]} failed with exit code {proc.returncode}")
    return proc.returncode, json.loads(proc.stdout)


def main(argv: list[str] | None = None) -> None:
    import argparse

    parser = argparse.ArgumentParser(prog="scripts/demo", description=__doc__.split("\n\n")[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="setup shows pip's and the compiler's output")
    parser.parse_args(argv)
    state = ROOT / "demo-state"
    shutil.rmtree(state, ignore_errors=True)
    state.mkdir()
    console.rule("[bold]atrund demo[/bold]")
    t0 = time.monotonic()
    with LocalStack() as stack:
        console.print(f"local PDS [cyan]{stack.pds_url}[/cyan], PLC [cyan]{stack.plc_url}[/cyan] "
                      f"(ready in {time.monotonic() - t0:.1f} s)")
        alice = stack.create_account("alice")
        runner = stack.create_account("runner")
        console.print(f"author [cyan]{alice.handle}[/cyan] {alice.did}")
        console.print(f"runner [cyan]{runner.handle}[/cyan] {runner.did}")

        (state / "app-password").write_text(runner.app_password)
        (state / "app-password").chmod(0o600)
        config = state / "config.toml"
        config.write_text(
            f'[runner]\npds = "{stack.pds_url}"\nidentifier = "{runner.handle}"\npassword_file = "app-password"\n'
            f'description = "The atrund demo runner."\n\n'
            f'{stack.identity_toml()}\n'
            f'[access]\nmode = "allowlist"\nallowlist = ["{alice.did}"]\n\n'
            f'[ingest]\nmode = "firehose"  # each invocation arrives as its commit does: no poll interval to wait out\n\n'
            f'[schedules]\nmin_interval_seconds = 5  # the demo cannot wait the default minute\njitter_seconds = 0\n\n'
            f'[permissions]\nenv = ["SIGNING_KEY"]\n\n'
            '[gateway]\nlisten = "127.0.0.1:0"  # any free port: the demo must not fail because 8080 is taken\n'
        )
        atrund(["keys", "init", "-c", str(config.relative_to(ROOT))], dict(os.environ))  # the key sealed secrets are sealed to
        log_path = state / "runner.log"
        console.print(f"[dim]$[/dim] [bold]atrund serve -c {config.relative_to(ROOT)}[/bold]  [dim](log: {log_path.relative_to(ROOT)})[/dim]")
        with open(log_path, "w") as log:
            serve = subprocess.Popen([sys.executable, "-m", "atrund.cli", "serve", "-c", str(config), "--json-logs"],
                                     cwd=state, stdout=log, stderr=log)
        try:
            run_author_side(stack, alice, runner)
            schedule_and_trigger(stack, alice, runner)
        finally:
            serve.terminate()
            serve.wait(15)
        console.print(f"runner stopped; its log is in {log_path.relative_to(ROOT)}")
    console.rule(f"done in {time.monotonic() - t0:.1f} s")
    # Only what works once the demo's stack is gone:
    console.print("Next: [bold].venv/bin/atrund exec examples/hello.py --runtime python --endpoint greet "
                  "--args '{\"name\": \"you\"}'[/bold] runs a bundle here, no PDS needed; "
                  "README.md \"For bundle authors\" is the path to your own PDS and runner.")


def run_author_side(stack: LocalStack, alice, runner) -> None:
    env = {**os.environ, "ATRUND_PDS": stack.pds_url, "ATRUND_PLC_URL": stack.plc_url, "SIGNING_KEY": SIGNING_KEY,
           "ATRUND_SESSION_FILE": str(ROOT / "demo-state" / "session.json")}
    env.pop("ATRUND_PASSWORD", None)
    console.rule("alice logs in once, then publishes bundles", style="dim")
    atrund(["login", "--identifier", alice.handle], {**env, "ATRUND_PASSWORD": alice.app_password})
    bundles = {}
    _wait_for_runner_record(stack, runner)  # publishing with --secret reads the runner's key from it
    for name in sorted({b for b, _, _ in INVOCATIONS}):
        extra = ["--secret", "SIGNING_KEY", "--runner", runner.did] if name == "signed.py" else []
        _, out = atrund(["bundle", "publish", f"examples/{name}", "--runtime", RUNTIME[Path(name).suffix], *extra], env)
        bundles[name] = out
        console.print(f"  → {out['uri']}  [dim]cid {out['cid']}[/dim]")
    console.rule("alice invokes them on the runner and waits for the result records", style="dim")
    table = Table(title="results", show_lines=True)
    for col in ("call", "ran on", "status", "result AT URI", "value or error", "ms"):
        table.add_column(col, overflow="fold")
    for name, endpoint, args in INVOCATIONS:
        t = time.monotonic()
        _, out = atrund(["invoke", bundles[name]["uri"], "--runner", runner.did, "--endpoint", endpoint,
                         "--args", json.dumps(args), "--wait", "--json"], env)
        ms = int((time.monotonic() - t) * 1000)
        status = out.get("status", "?")
        shown = json.dumps(out["value"]) if "value" in out else out["record"].get("error", "")
        colour = "green" if status == "success" else "red"
        console.print(f"  → [{colour}]{status}[/{colour}] {out['result']}\n    {shown}")
        m = out["record"].get("metrics", {})
        table.add_row(f"{name} {endpoint}({json.dumps(args)})", f"{m.get('runtime')} / {m.get('isolation')}",
                      f"[{colour}]{status}[/{colour}]", out["result"], shown, str(ms))
    console.print(table)
    leaked = SIGNING_KEY in json.dumps(out) or SIGNING_KEY in (ROOT / "demo-state" / "runner.log").read_text()
    console.print(f"signed.py's key was sealed to the runner's key in its bundle record; it appears in the result record "
                  f"or the runner's log: [bold]{'YES (a bug)' if leaked else 'no'}[/bold]")
    rkey = bundles["counter.py"]["uri"].rsplit("/", 1)[1]
    console.print("counter.py kept its count in its state on the runner, committed with each result; alice reads it:")
    _, hits = atrund(["state", "get", "--runner", runner.did, "--bundle", rkey, "--json"], env)
    console.print(f"  → {json.dumps(hits)}")
    console.print("Anyone can read a result by its URI (no login):")
    _, got = atrund(["result", "get", out["result"], "--plc-url", stack.plc_url, "--json"], env)
    console.print(f"  → {got['status']}: {json.dumps(got.get('value'))}")


def schedule_and_trigger(stack: LocalStack, alice, runner) -> None:
    """Time and records as invokers: a schedule ticks, and a like of alice's post fires a trigger."""
    env = {**os.environ, "ATRUND_PDS": stack.pds_url, "ATRUND_IDENTIFIER": alice.handle,
           "ATRUND_PASSWORD": alice.app_password, "ATRUND_PLC_URL": stack.plc_url}
    console.rule("alice schedules a bundle and sets a trigger on likes of her posts", style="dim")
    _, bundle = atrund(["bundle", "publish", "examples/reactions.py", "--runtime", RUNTIME[".py"]], env)
    start = datetime.fromtimestamp(time.time() + 3, timezone.utc).isoformat(timespec="seconds")
    _, sched = atrund(["schedule", "create", bundle["uri"], "--runner", runner.did, "--endpoint", "tick",
                       "--every", "5", "--start-at", start], env)
    console.print(f"  → schedule {sched['uri']}, next run {sched['next']}")
    _, trig = atrund(["trigger", "create", bundle["uri"], "--runner", runner.did, "--endpoint", "thanks",
                      "--collection", "app.bsky.feed.like", "--about-me", "--results", "all"], env)
    console.print(f"  → trigger {trig['uri']}, filter {json.dumps(trig['filter'])}")
    asyncio.run(_like_and_wait(stack, alice, runner, sched, trig))
    _, ticks = atrund(["result", "list", "--schedule", sched["uri"]], env)
    for r in ticks[:3]:
        console.print(f"  → tick {r['scheduledAt']}: [green]{r['status']}[/green] {json.dumps(r.get('value'))}")


async def _like_and_wait(stack: LocalStack, alice, runner, sched: dict, trig: dict) -> None:
    """bob likes alice's post; wait for the trigger's result at its computed key, and a tick's."""
    bob = stack.create_account("bob")
    async with client.reader(stack.plc_url) as repos:
        sessions = [await client.login(repos, who.handle, who.app_password, stack.pds_url) for who in (alice, bob)]
        try:
            await asyncio.sleep(1.0)  # the runner takes the trigger at its next ingest round
            post_uri, post_cid = await sessions[0].create_record(
                "app.bsky.feed.post", {"text": "hello from the atrund demo", "createdAt": now_iso()})
            like_uri, like_cid = await sessions[1].create_record(
                "app.bsky.feed.like", {"subject": {"uri": post_uri, "cid": post_cid}, "createdAt": now_iso()})
            console.print(f"  bob likes alice's post: {like_uri}")
            t = time.monotonic()
            found = await client.wait_result(repos, runner.did, firing_key(trig["uri"], like_uri, like_cid), 30)
            if found is None:
                raise SystemExit("the trigger did not fire; see demo-state/runner.log")
            console.print(f"  → trigger fired in {time.monotonic() - t:.1f} s: [green]{found['status']}[/green] "
                          f"{json.dumps(found.get('value'))}")
            tick = datetime.fromisoformat(sched["next"].replace("Z", "+00:00")).timestamp()
            if await client.wait_result(repos, runner.did, tick_key(sched["uri"], tick), 30) is None:
                raise SystemExit("the schedule did not tick; see demo-state/runner.log")
        finally:
            for session in sessions:
                await session.close()


def _wait_for_runner_record(stack: LocalStack, runner, timeout: float = 60) -> None:
    asyncio.run(_runner_record(stack, runner, timeout))


async def _runner_record(stack: LocalStack, runner, timeout: float) -> None:
    """Read the runner's dev.atrun.runner record as any AT client would, until it is there."""
    deadline = time.monotonic() + timeout
    async with client.reader(stack.plc_url) as repos:
        while True:
            try:
                await repos.get_record(runner.did, RUNNER, "self")
                return
            except AtrundError:  # not there yet (NotFound), or the PDS is still busy
                if time.monotonic() > deadline:
                    raise SystemExit("the runner did not publish its record; see demo-state/runner.log") from None
                await asyncio.sleep(0.3)


if __name__ == "__main__":
    main()
