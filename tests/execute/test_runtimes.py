"""The Deno and Node runtimes (nix/runtimes/deno, nix/runtimes/node) with real subprocesses.

Every request goes through ``create_executor`` and the worker pool, on every backend (``none``,
``process``, ``container``, ``container`` under gVisor), so what is pinned here is what a runner
gets. Tests that only make sense for one runtime say so in their name. Each docstring says what
the test pins.
"""

from __future__ import annotations

import asyncio
import base64
import importlib.machinery
import importlib.util
import json
import os
import shutil
import socket
import tempfile
import textwrap
import time
import uuid
from pathlib import Path

import pytest
from conftest import ISOLATIONS, execute_once, executor_settings, gone, require_isolation

from atrund.config import REPO_ROOT
from atrund.execute import ExecRequest, create_executor
from atrund.execute.protocol import ExecPermissions

EXTENSION = {"deno": ".ts", "node": ".mjs"}
# V8 in deno 2.9 maps its 512 MiB code range writable at start, which RLIMIT_DATA counts:
# deno cannot start under the default memory_mb (512). See test_deno_refuses_a_data_limit_it_cannot_start_under.
MEMORY_MB = 1024


@pytest.fixture(params=["deno", "node"])
def runtime(request) -> str:
    return request.param


@pytest.fixture(params=ISOLATIONS)
def isolation(request) -> str:
    """Every backend: the runtime's own fence must hold with or without the outer ones."""
    return require_isolation(request)


@pytest.fixture
def shared():
    """A directory both backends' workers can reach (the process backend's /tmp is private,
    and its workers run as an unprivileged uid)."""
    d = Path(tempfile.mkdtemp(prefix="atrund-rt-", dir="/var/tmp"))
    os.chmod(d, 0o777)
    yield d
    shutil.rmtree(d, ignore_errors=True)


def src(source: str | dict[str, str], runtime: str) -> str:
    return textwrap.dedent(source[runtime] if isinstance(source, dict) else source)


async def run(runtime, isolation, tmp_path, source, endpoint="main", args=None, permissions=None, env=None,
              timeout=10, **settings):
    path = tmp_path / f"bundle{EXTENSION[runtime]}"
    path.write_text(src(source, runtime))
    return await execute_once(runtime, str(path), endpoint=endpoint, args=args, permissions=permissions, env=env,
                              timeout=timeout, isolation=isolation, **{"memory_mb": MEMORY_MB, **settings})


def needs_granted_network(isolation: str) -> None:
    if isolation == "container+runsc":
        pytest.skip("gVisor runs with --network=none here, so a network grant is refused (asserted in test_container.py)")


def runtime_pids(marker: str) -> list[int]:
    """Host pids of deno/node processes whose command line contains ``marker``."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                argv = f.read().split(b"\0")
        except OSError:
            continue
        if argv and os.path.basename(argv[0]) in (b"deno", b"node") and any(marker.encode() in a for a in argv):
            found.append(int(entry))
    return found


class HttpServer:
    """A tiny HTTP server on 127.0.0.1 that answers "hello" and counts connections."""

    async def __aenter__(self):
        self.connections = 0
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def _serve(self, reader, writer):
        self.connections += 1
        try:
            await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
            writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: 5\r\nconnection: close\r\n\r\nhello")
            await writer.drain()
        except (asyncio.TimeoutError, asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    async def __aexit__(self, *exc):
        self.server.close()
        await self.server.wait_closed()


# -- calling endpoints -----------------------------------------------------------------------

async def test_return_value_survives_prints(runtime, isolation, tmp_path):
    """Prints on stdout and stderr, at import and call time, never reach the protocol line;
    the return value comes back as data with executionTimeMs."""
    r = await run(runtime, isolation, tmp_path, {
        "deno": """
            console.log("import-time noise");
            export function main(args: Record<string, unknown>) {
              console.log("call-time noise");
              console.error("to stderr");
              Deno.stdout.writeSync(new TextEncoder().encode("raw stdout\\n"));
              return { got: args };
            }
        """,
        "node": """
            console.log("import-time noise");
            export function main(args) {
              console.log("call-time noise");
              console.error("to stderr");
              process.stdout.write("raw stdout\\n");
              return { got: args };
            }
        """,
    }, args={"x": 1})
    assert r.success and r.data == {"got": {"x": 1}}
    assert r.metrics.execution_time_ms is not None


async def test_async_endpoint_is_awaited(runtime, isolation, tmp_path):
    """An endpoint that returns a promise is awaited."""
    r = await run(runtime, isolation, tmp_path, """
        export async function main() {
          await new Promise((resolve) => setTimeout(resolve, 10));
          return [1, 2, 3];
        }
    """)
    assert r.success and r.data == [1, 2, 3]


async def test_exception_reports_type_message_and_line(runtime, isolation, tmp_path):
    """A thrown error becomes {success: false, error: "<Type>: <message> (line N)", errorType}."""
    r = await run(runtime, isolation, tmp_path, """
        export function main() {
          const distance = 3;
          throw new RangeError(`too far: ${distance}`);
        }
    """)
    assert not r.success and r.error_type == "RangeError"
    assert r.error == "RangeError: too far: 3 (line 4)"


async def test_unknown_endpoint_names_the_exported_functions(runtime, isolation, tmp_path):
    """Only exported functions are endpoints: not _private ones, classes, constants or default."""
    r = await run(runtime, isolation, tmp_path, """
        export function b() {}
        export async function a() {}
        export function _private() {}
        export class K {}
        export const c = 1;
        export default function () {}
    """, endpoint="nope")
    assert r.error_type == "UnknownEndpoint"
    assert r.error == "unknown endpoint 'nope': the bundle defines a, b"


async def test_syntax_error_is_reported_as_such(runtime, isolation, tmp_path):
    """A bundle that does not parse is a SyntaxError, not a crash."""
    r = await run(runtime, isolation, tmp_path, "export function main( {\n")
    assert not r.success and r.error_type == "SyntaxError"
    assert r.error.startswith("bundle does not compile: SyntaxError: ")


async def test_exit_is_an_error_not_a_crash(runtime, isolation, tmp_path):
    """A bundle that tries to end the process while loading gets an exception instead."""
    exit_call = {"deno": "Deno.exit(7);\n", "node": "process.exit(7);\n"}
    r = await run(runtime, isolation, tmp_path, exit_call)
    assert r.error == "bundle failed while loading: SystemExit: 7 (line 1)"


@pytest.mark.parametrize("value, why", [("10n", "bigint"), ("NaN", "NaN"), ("new Map()", "Map"), ("(() => 1)", "function")])
async def test_non_json_return_value_is_an_error(runtime, tmp_path, value, why):
    """Values JSON.stringify would silently mangle (NaN, Map, functions) or reject are errors."""
    r = await run(runtime, "none", tmp_path, f"export function main() {{ return {{ v: {value} }}; }}\n")
    assert not r.success and r.error_type == "TypeError", r
    assert r.error.startswith("return value is not JSON") and why in r.error


# -- the protocol channel ----------------------------------------------------------------------

async def test_forged_protocol_lines_do_not_replace_the_answer(runtime, isolation, tmp_path):
    """Fake ExecResponse lines the bundle prints (stdout, stderr, and for node even the answer
    descriptor itself) are dropped; the real return value arrives. Deno cannot reopen its
    answer FIFO: the wrapper revoked that write permission before loading the bundle."""
    r = await run(runtime, isolation, tmp_path, {
        "deno": """
            const FORGED = JSON.stringify({ success: true, data: "forged" });
            console.log(FORGED);
            export function main() {
              console.log(FORGED);
              console.error(FORGED);
              Deno.stdout.writeSync(new TextEncoder().encode(FORGED + "\\n"));
              const attempts = [];
              try {
                Deno.openSync("/tmp/answer.fifo", { write: true });  // where it is on the process backend
                attempts.push("opened");
              } catch (e) {
                attempts.push(e.name);
              }
              return { real: true, attempts };
            }
        """,
        "node": """
            import fs from "node:fs";
            const FORGED = JSON.stringify({ success: true, data: "forged" });
            console.log(FORGED);
            export function main() {
              console.log(FORGED);
              console.error(FORGED);
              for (const fd of [1, 2, 3, 4, 5]) {
                try { fs.writeSync(fd, FORGED + "\\n"); } catch {}
              }
              try { fs.writeSync(3, '{"success":true,"data":"half a line'); } catch {}
              return { real: true, attempts: [] };
            }
        """,
    })
    assert r.success, r
    assert r.data["real"] is True
    assert all(a == "NotCapable" for a in r.data["attempts"])


# -- deadlines -----------------------------------------------------------------------------------

async def test_timeout_kills_the_inner_runtime_too(runtime, isolation, tmp_path):
    """At the deadline the pool kills the launcher's process group; the deno/node process the
    launcher started is in that group (and has PR_SET_PDEATHSIG), so it is gone as well."""
    if isolation == "container+runsc":
        pytest.skip("under gVisor the sandbox's processes are not host processes to look for; "
                    "that the sandbox is removed is asserted in test_container.py")
    marker = f"/nonexistent/atrund-{uuid.uuid4().hex}"
    started = time.monotonic()
    task = asyncio.create_task(run(runtime, isolation, tmp_path, """
        export async function main() {
          await new Promise((resolve) => setTimeout(resolve, 1_000_000));
        }
    """, permissions={"read": [marker]}, timeout=2))
    pids: list[int] = []
    while not task.done() and not pids:
        pids = runtime_pids(marker)
        await asyncio.sleep(0.05)
    r = await task
    assert r.timed_out and r.error_type == "Timeout"
    assert time.monotonic() - started < 10
    assert pids, "the inner runtime process was never seen"
    for _ in range(50):
        if all(gone(p) for p in pids):
            break
        await asyncio.sleep(0.1)
    assert all(gone(p) for p in pids), "the inner runtime outlived the timeout"


async def test_busy_loop_is_killed_at_the_deadline(runtime, tmp_path):
    """Pure CPU that never yields to the event loop is still stopped on time."""
    r = await run(runtime, "none", tmp_path, "export function main() { for (;;) {} }\n", timeout=1)
    assert r.timed_out


# -- files -----------------------------------------------------------------------------------------

READ = {
    "deno": """
        export function main(args: { paths: string[] }) {
          return args.paths.map((p) => {
            try { return Deno.readTextFileSync(p); } catch (e) { return e.name; }
          });
        }
    """,
    "node": """
        import fs from "node:fs";
        export function main(args) {
          return args.paths.map((p) => {
            try { return fs.readFileSync(p, "utf8"); } catch (e) { return e.code; }
          });
        }
    """,
}
DENIED = {"deno": "NotCapable", "node": "ERR_ACCESS_DENIED"}


async def test_reads_outside_granted_paths_are_denied(runtime, isolation, tmp_path, shared):
    """--allow-read / --allow-fs-read hold exactly the bundle file and the granted paths: a
    file in a granted directory reads, a file next to it and /etc/hostname do not."""
    (shared / "granted").mkdir(mode=0o755)
    (shared / "granted" / "ok.txt").write_text("visible")
    (shared / "secret.txt").write_text("runner secret")
    os.chmod(shared / "granted" / "ok.txt", 0o644)
    os.chmod(shared / "secret.txt", 0o644)
    paths = [str(shared / "granted" / "ok.txt"), str(shared / "secret.txt"), "/etc/hostname"]
    r = await run(runtime, isolation, tmp_path, READ, args={"paths": paths}, permissions={"read": [str(shared / "granted")]})
    assert r.success, r
    assert r.data == ["visible", DENIED[runtime], DENIED[runtime]]


async def test_static_imports_are_checked_too(tmp_path, shared):
    """Deno: a module the bundle imports statically goes through --allow-read like any read,
    because the bundle itself is loaded with a runtime-built import()."""
    (shared / "data.json").write_text('{"secret": 1}')
    os.chmod(shared / "data.json", 0o644)
    r = await run("deno", "none", tmp_path, f"""
        import data from "{shared}/data.json" with {{ type: "json" }};
        export function main() {{ return data; }}
    """)
    assert not r.success and r.error.startswith("bundle failed while loading: TypeError")
    assert "Requires read access" in r.error


async def test_writes_outside_granted_paths_are_denied(runtime, isolation, tmp_path, shared):
    """--allow-write / --allow-fs-write hold exactly the granted paths."""
    out = shared / "out"
    out.mkdir()
    os.chmod(out, 0o777)
    r = await run(runtime, isolation, tmp_path, {
        "deno": """
            export function main(args: { paths: string[] }) {
              return args.paths.map((p) => {
                try { Deno.writeTextFileSync(p, "written"); return "ok"; } catch (e) { return e.name; }
              });
            }
        """,
        "node": """
            import fs from "node:fs";
            export function main(args) {
              return args.paths.map((p) => {
                try { fs.writeFileSync(p, "written"); return "ok"; } catch (e) { return e.code; }
              });
            }
        """,
    }, args={"paths": [str(out / "a.txt"), str(shared / "evil.txt")]}, permissions={"write": [str(out)]})
    assert r.success, r
    assert r.data == ["ok", DENIED[runtime]]
    assert (out / "a.txt").read_text() == "written"
    assert not (shared / "evil.txt").exists()


# -- environment -----------------------------------------------------------------------------------

async def test_only_granted_environment_variables_reach_the_bundle(runtime, isolation, tmp_path, monkeypatch):
    """The bundle sees the variables permissions.env names, with values from ExecRequest.env:
    not other request variables, not the runner's, not the runtime's own (DENO_DIR, PATH)."""
    monkeypatch.setenv("ATRUND_APP_PASSWORD", "runner-secret")
    r = await run(runtime, isolation, tmp_path, {
        "deno": """
            export function main() {
              const out: Record<string, unknown> = {};
              for (const name of ["GRANTED", "ABSENT", "NOT_GRANTED", "PATH", "DENO_DIR", "ATRUND_APP_PASSWORD"]) {
                try { out[name] = Deno.env.get(name) ?? null; } catch (e) { out[name] = e.name; }
              }
              try { out.all = Deno.env.toObject(); } catch (e) { out.all = e.name; }
              return out;
            }
        """,
        "node": "export function main() { return { ...process.env }; }\n",
    }, permissions={"env": ["GRANTED", "ABSENT"]}, env={"GRANTED": "yes", "NOT_GRANTED": "no"})
    assert r.success, r
    if runtime == "node":
        assert r.data == {"GRANTED": "yes"}
    else:
        assert r.data == {"GRANTED": "yes", "ABSENT": None, "NOT_GRANTED": "NotCapable", "PATH": "NotCapable",
                          "DENO_DIR": "NotCapable", "ATRUND_APP_PASSWORD": "NotCapable", "all": "NotCapable"}


async def test_variables_that_configure_the_runtime_cannot_be_granted(runtime, tmp_path):
    """Granting NODE_OPTIONS (it can grant node permissions) or DENO_DIR / HTTPS_PROXY (they
    change where deno loads from and connects through) is refused before anything runs."""
    name = {"deno": "HTTPS_PROXY", "node": "NODE_OPTIONS"}[runtime]
    r = await run(runtime, "none", tmp_path, "export function main() { return 1; }\n",
                  permissions={"env": [name]}, env={name: "--allow-fs-read=*"})
    assert not r.success and r.error_type == "InvalidPermissions" and name in r.error


# -- network ---------------------------------------------------------------------------------------

def _loopback_name() -> str | None:
    """A host name (not "localhost") that resolves to a loopback address here, if any."""
    for name in (socket.gethostname(), "vm", "runsc"):
        try:
            if name != "localhost" and socket.gethostbyname(name).startswith("127."):
                return name
        except OSError:
            continue
    return None


async def test_deno_loopback_is_denied_unless_granted_literally(isolation, tmp_path):
    """Deno: a request granted only host names cannot reach a loopback port, not by IP, not by
    a numeric alias (2130706433 = 127.0.0.1, checked after resolution), not through a granted
    name that resolves to 127.0.0.1 (--deny-net holds the private ranges)."""
    needs_granted_network(isolation)
    # The host's own names are not in a container's /etc/hosts.
    name = None if isolation.startswith("container") else _loopback_name()
    async with HttpServer() as server:
        grants = ["2130706433", "example.com", *([name] if name else [])]
        r = await run("deno", isolation, tmp_path, """
            export async function main(args: { port: number; name: string | null }) {
              const out: Record<string, string> = {};
              const attempt = async (label: string, f: () => Promise<unknown>) => {
                try { await f(); out[label] = "connected"; } catch (e) { out[label] = e.name; }
              };
              await attempt("ip", () => fetch(`http://127.0.0.1:${args.port}/`).then((r) => r.text()));
              await attempt("numeric", () => Deno.connect({ hostname: "2130706433", port: args.port }).then((c) => c.close()));
              if (args.name) {
                await attempt("name-connect", () => Deno.connect({ hostname: args.name!, port: args.port }).then((c) => c.close()));
                await attempt("name-fetch", () => fetch(`http://${args.name}:${args.port}/`).then((r) => r.text()));
              }
              return out;
            }
        """, args={"port": server.port, "name": name}, permissions={"net": grants})
        assert r.success, r
        assert r.data["ip"] == "NotCapable"
        assert r.data["numeric"] == "NotCapable"
        if name:
            assert r.data["name-connect"] == "NotCapable"
            assert r.data["name-fetch"] == "TypeError"  # fetch wraps the NotCapable of the resolved address
        assert server.connections == 0


async def test_node_network_is_fenced_by_the_process_backend_only(tmp_path):
    """Node 22 has no network permission: with no net grant, only the process backend's network
    namespace keeps the bundle off a loopback port."""
    async with HttpServer() as server:
        r = await run("node", "process", tmp_path, """
            export async function main(args) {
              try { return await (await fetch(`http://127.0.0.1:${args.port}/`)).text(); } catch (e) { return e.name; }
            }
        """, args={"port": server.port})
        assert r.success and r.data == "TypeError"
        assert server.connections == 0


async def test_granted_network_works(runtime, isolation, tmp_path):
    """A literal grant of 127.0.0.1:PORT opens exactly that: the private-range deny list is cut
    around the granted address (and, under process, the egress proxy reaches it because the
    operator grants the range in net_private)."""
    if isolation.startswith("container"):
        pytest.skip("the test server listens on the host's loopback, which a container never reaches "
                    "(127.0.0.1 is its own); network in containers is asserted in test_container.py")
    async with HttpServer() as server:
        r = await run(runtime, isolation, tmp_path, """
            export async function main(args) {
              return await (await fetch(`http://127.0.0.1:${args.port}/`)).text();
            }
        """, args={"port": server.port}, permissions={"net": [f"127.0.0.1:{server.port}"], "net_private": ["127.0.0.1/32"]})
        assert r.success and r.data == "hello", r
        assert server.connections == 1


async def test_deno_remote_imports_are_refused(isolation, tmp_path):
    """Deno: https:, npm: and jsr: imports are refused (--no-remote, --no-npm), even when the
    hosts they would come from are granted network access."""
    needs_granted_network(isolation)
    hosts = ["deno.land", "jsr.io", "registry.npmjs.org"]
    r = await run("deno", isolation, tmp_path, """
        export async function main() {
          const out: Record<string, string> = {};
          for (const spec of ["https://deno.land/std@0.224.0/path/mod.ts", "npm:left-pad@1.3.0", "jsr:@std/path@1"]) {
            try { await import(spec); out[spec] = "loaded"; } catch (e) { out[spec] = String(e.message); }
          }
          return out;
        }
    """, permissions={"net": hosts})
    assert r.success, r
    assert "--no-remote" in r.data["https://deno.land/std@0.224.0/path/mod.ts"]
    assert "--no-npm" in r.data["npm:left-pad@1.3.0"]
    assert "--no-remote" in r.data["jsr:@std/path@1"]
    r = await run("deno", isolation, tmp_path, """
        import { join } from "https://deno.land/std@0.224.0/path/mod.ts";
        export function main() { return join("a", "b"); }
    """, permissions={"net": hosts})
    assert not r.success and r.error.startswith("bundle failed while loading") and "--no-remote" in r.error


def test_deny_list_is_cut_around_literal_grants():
    """The --deny-net list: every private IPv4 range and ::1, minus exactly the addresses a
    grant names literally (an IP, a CIDR range, or localhost); host names cut nothing."""
    path = REPO_ROOT / "nix/runtimes/deno/at-run-exec"
    loader = importlib.machinery.SourceFileLoader("deno_at_run_exec", str(path))
    module = importlib.util.module_from_spec(importlib.util.spec_from_loader(loader.name, loader))
    loader.exec_module(module)
    full = module.deny_net(["example.com"])
    assert "127.0.0.0/8" in full and "10.0.0.0/8" in full and "169.254.0.0/16" in full and "[::1]" in full
    cut = module.deny_net(["127.0.0.1:8080"])
    assert "127.0.0.0/8" not in cut and "127.0.0.0/32" in cut and "127.0.0.2/31" in cut and "127.128.0.0/9" in cut
    assert module.deny_net(["10.0.0.0/8", "vm"]) == [n for n in full if n != "10.0.0.0/8"]
    local = module.deny_net(["localhost:3000"])
    assert "[::1]" not in local and "127.0.0.0/8" not in local


# -- HTTP-style endpoints ----------------------------------------------------------------------

REQUEST = {
    "method": "POST",
    "path": "/echo/x",
    "query": {"a": "1", "b": ["2", "3"]},
    "headers": {"content-type": "text/plain", "x-test": "yes"},
    "body": "hello",
}


async def test_deno_handle_request_gets_a_request_and_returns_a_response(isolation, tmp_path):
    """Deno: handleRequest receives a web Request (http://bundle.invalid + path + query) and
    its Response becomes response {status, headers, body, isBase64}."""
    r = await run("deno", isolation, tmp_path, """
        export async function handleRequest(req: Request): Promise<Response> {
          const url = new URL(req.url);
          const seen = {
            url: req.url,
            method: req.method,
            path: url.pathname,
            b: url.searchParams.getAll("b"),
            header: req.headers.get("x-test"),
            body: await req.text(),
          };
          return new Response(JSON.stringify(seen), { status: 201, headers: { "content-type": "application/json", "x-out": "1" } });
        }
    """, endpoint="handleRequest", args=REQUEST)
    assert r.success and r.data is None, r
    assert r.response.status == 201 and r.response.is_base64 is False
    assert r.response.headers["x-out"] == "1" and r.response.headers["content-type"] == "application/json"
    assert json.loads(r.response.body) == {
        "url": "http://bundle.invalid/echo/x?a=1&b=2&b=3", "method": "POST", "path": "/echo/x",
        "b": ["2", "3"], "header": "yes", "body": "hello",
    }


async def test_deno_binary_bodies_are_base64_both_ways(tmp_path):
    """Deno: an isBase64 request body reaches the Request as bytes; a binary Response body
    comes back base64 with isBase64 true."""
    raw = bytes([0, 255, 1, 128])
    r = await run("deno", "none", tmp_path, """
        export async function handleRequest(req: Request): Promise<Response> {
          const bytes = new Uint8Array(await req.arrayBuffer());
          return new Response(bytes.reverse(), { headers: { "content-type": "application/octet-stream" } });
        }
    """, endpoint="handleRequest", args={"method": "PUT", "path": "/", "body": base64.b64encode(raw).decode(), "isBase64": True})
    assert r.success, r
    assert r.response.status == 200 and r.response.is_base64 is True
    assert base64.b64decode(r.response.body) == raw[::-1]


async def test_handle_request_plain_object_response(runtime, tmp_path):
    """A plain {status, headers, body} from handleRequest becomes response, a non-string body
    as JSON (as in the Python runtime); Node's handleRequest gets the request object as sent."""
    r = await run(runtime, "none", tmp_path, """
        export function handleRequest(req) {
          const seen = req instanceof Request ? { method: req.method } : { method: req.method, body: req.body, query: req.query };
          return { status: 404, headers: { "x-n": 7 }, body: seen };
        }
    """, endpoint="handleRequest", args=REQUEST)
    assert r.success, r
    assert r.response.status == 404 and r.response.headers == {"x-n": "7"} and r.response.is_base64 is False
    seen = json.loads(r.response.body)
    if runtime == "node":
        assert seen == {"method": "POST", "body": "hello", "query": {"a": "1", "b": ["2", "3"]}}
    else:
        assert seen == {"method": "POST"}


async def test_node_handle_request_may_return_a_response(tmp_path):
    """Node: a web Response (global in Node 22) is shaped like Deno's, binary bodies base64."""
    r = await run("node", "none", tmp_path, """
        export function handleRequest(req) {
          return new Response(new Uint8Array([1, 2, 250]), { status: 202, headers: { "content-type": "image/png" } });
        }
    """, endpoint="handleRequest", args=REQUEST)
    assert r.success and r.response.status == 202 and r.response.is_base64 is True
    assert base64.b64decode(r.response.body) == bytes([1, 2, 250])


# -- limits --------------------------------------------------------------------------------------

async def test_deno_starts_under_the_default_memory_limit(tmp_path):
    """V8's code range alone takes 512 MiB of RLIMIT_DATA; runtime.json's dataOverheadMb adds that
    to memory_mb for Deno, so the default (512) works."""
    r = await run("deno", "none", tmp_path, "export function main() { return 1; }\n", memory_mb=512)
    assert r.success and r.data == 1


async def test_deno_refuses_a_data_limit_it_cannot_start_under(tmp_path):
    """Below what V8 needs even with the overhead, the launcher explains instead of letting V8 abort."""
    r = await run("deno", "none", tmp_path, "export function main() { return 1; }\n", memory_mb=16)
    assert not r.success and r.error_type == "ResourceLimit" and "memory_mb" in r.error


async def test_deno_refuses_grants_it_cannot_express(tmp_path):
    """Deno: a unix socket grant (it would reach docker.sock-like sockets) and a path with a comma
    (deno's flag lists are comma separated) are refused rather than widened or split."""
    for permissions in ({"net": ["unix:/var/run/docker.sock"]}, {"read": ["/srv/a,/etc"]}):
        r = await run("deno", "none", tmp_path, "export function main() { return 1; }\n", permissions=permissions)
        assert not r.success and r.error_type == "InvalidPermissions", r


async def test_warm_worker_takes_the_request_permissions(runtime, isolation, tmp_path):
    """A worker started before its request (warm) still runs the bundle under that request's
    flags: the launcher starts deno/node only once the request is read."""
    path = tmp_path / f"bundle{EXTENSION[runtime]}"
    path.write_text(src({
        "deno": 'export function main() { return Deno.env.get("TOKEN"); }\n',
        "node": "export function main() { return process.env.TOKEN; }\n",
    }, runtime))
    executor = create_executor(executor_settings(isolation, warm=1, memory_mb=MEMORY_MB))
    try:
        await executor.warm(1)
        assert executor.stats().warm[runtime] == 1
        r = await executor.execute(ExecRequest(code_path=str(path), endpoint="main", env={"TOKEN": "t0k"},
                                               permissions=ExecPermissions(env=["TOKEN"])), runtime)
        assert r.success and r.data == "t0k", r
        assert executor.stats().cold_starts == 0
    finally:
        await executor.shutdown()


async def test_self_test_bundles(runtime, isolation):
    """The runtime directory's own test bundle answers {ok: true, echo: args}."""
    path = REPO_ROOT / f"nix/runtimes/{runtime}/test-bundle{EXTENSION[runtime]}"
    executor = create_executor(executor_settings(isolation, warm=0, memory_mb=MEMORY_MB))
    try:
        r = await executor.execute(ExecRequest(code_path=str(path), endpoint="test", args={"a": [1]}), runtime)
    finally:
        await executor.shutdown()
    assert r.success and r.data == {"ok": True, "echo": {"a": [1]}}
