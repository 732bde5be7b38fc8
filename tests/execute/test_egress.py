"""The egress path of a worker granted network (process backend), attacked.

Every target lives in a network namespace this test makes (``world``): the test's event loop,
so the runner under test, joins it for the test's duration, and the test hosts are addresses
of its loopback device: "api.test" 10.9.0.2 (the granted host), "other.test" 10.9.0.3,
a "LAN" host 10.9.0.4 and fd09::4, a "metadata" host 169.254.169.254, and the namespace's own
loopback. The namespace has no route anywhere else, so nothing here can reach a real address.
Names resolve through the test's DNS server on the world's loopback
(``executor.egress_nameserver``).
"""

import asyncio
import ctypes
import os
import socket
import subprocess
import textwrap

import dns.message
import dns.rdatatype
import dns.rrset
import pytest
from conftest import execute_once, require_isolation

CLONE_NEWNET = 0x40000000
UID_BASE = 964_000  # this file's own sandbox uids
HOSTS = {"api.test": ["10.9.0.2", "fd09::2"], "other.test": ["10.9.0.3"], "lan.test": ["10.9.0.4", "fd09::4"],
         "meta.test": ["169.254.169.254"], "rebind.test": ["127.0.0.1", "::1"], "mapped.test": ["::ffff:10.9.0.4"]}
WORLD = """link set lo up
addr add 10.9.0.2/32 dev lo
addr add 10.9.0.3/32 dev lo
addr add 10.9.0.4/32 dev lo
addr add 169.254.169.254/32 dev lo
addr add fd09::2/128 dev lo
addr add fd09::4/128 dev lo
"""
FLOOD = 128 << 20
pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="the process backend and network namespaces need root")
libc = ctypes.CDLL(None, use_errno=True)


class World:
    """The test's hosts: a TCP server on port 443 (and 8443) of every address, recording which
    address each connection reached; UDP sinks on 9999 and 53 (another resolver) of every address."""

    def __init__(self) -> None:
        self.reached: list[str] = []
        self.datagrams: list[tuple[str, int]] = []
        self.servers = []
        self.transports = []
        self.dns_port = 0
        self.flooded = 0  # bytes the flood server (8081) got into its socket

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        for port, serve in ((443, self._tcp), (8443, self._tcp), (8080, self._bulk), (8081, self._flood)):
            s = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
            s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind(("::", port))
            self.servers.append(await asyncio.start_server(serve, sock=s))
        world = self

        class Sink(asyncio.DatagramProtocol):
            def __init__(self, port):
                self.port = port

            def datagram_received(self, data, addr):
                world.datagrams.append((addr[0], self.port))

        class Names(asyncio.DatagramProtocol):
            def connection_made(self, transport):
                self.transport = transport

            def datagram_received(self, data, addr):
                query = dns.message.from_wire(data)
                reply = dns.message.make_response(query)
                q = query.question[0]
                name = q.name.to_text().rstrip(".")
                family = 4 if q.rdtype == dns.rdatatype.A else 6
                found = [a for a in HOSTS.get(name, []) if (":" in a) == (family == 6)]
                if found and q.rdtype in (dns.rdatatype.A, dns.rdatatype.AAAA):
                    reply.answer.append(dns.rrset.from_text_list(q.name, 5, "IN", q.rdtype, found))
                self.transport.sendto(reply.to_wire(), addr)

        for port in (9999, 53):
            t, _ = await loop.create_datagram_endpoint(lambda p=port: Sink(p), local_addr=("::", port))
            self.transports.append(t)
        t, _ = await loop.create_datagram_endpoint(Names, local_addr=("127.0.0.1", 0))
        self.transports.append(t)
        self.dns_port = t.get_extra_info("sockname")[1]

    async def _tcp(self, reader, writer):
        host = writer.get_extra_info("sockname")[0]
        self.reached.append(host.removeprefix("::ffff:"))
        writer.write(b"hello from " + host.encode())
        await writer.drain()
        writer.close()

    async def _bulk(self, reader, writer):
        """Counts what comes until EOF, answers the count and 4 MiB."""
        count = 0
        while chunk := await reader.read(1 << 16):
            count += len(chunk)
        writer.write(f"{count}\n".encode() + b"d" * (4 << 20))
        await writer.drain()
        writer.close()

    async def _flood(self, reader, writer):
        """Sends up to FLOOD bytes as fast as the other end takes them."""
        try:
            while self.flooded < FLOOD:
                writer.write(b"f" * (1 << 16))
                await writer.drain()
                self.flooded += 1 << 16
        except OSError:
            pass
        writer.close()

    def close(self) -> None:
        for s in self.servers:
            s.close()
        for t in self.transports:
            t.close()


@pytest.fixture
async def world():
    """This thread (the event loop's, so the runner's) in a namespace of the test's own."""
    own = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    assert libc.unshare(CLONE_NEWNET) == 0, os.strerror(ctypes.get_errno())
    w = World()
    try:
        subprocess.run(["ip", "-batch", "-"], input=WORLD.encode(), check=True, capture_output=True)
        await w.start()
        yield w
    finally:
        w.close()
        assert libc.setns(own, CLONE_NEWNET) == 0
        os.close(own)


@pytest.fixture(params=["process", "process-exec", "container", "microvm"])
def isolation(request) -> str:
    """Every backend whose workers get a network of their own, the process backend's both ways
    of starting a worker (fork server, exec path); the container engine, if there is one here,
    is asked before the test joins its namespace. The microVM (its guest relays to the same
    proxy) only in tests marked ``vm``: a VM under TCG is slow."""
    if request.param == "process-exec":
        return request.param
    return require_isolation(request)


async def run(world, runtime, source, net, net_private=(), args=None, isolation="process"):
    ext = {"python": ".py", "node": ".mjs", "deno": ".ts"}[runtime]
    # Under /var/tmp: the process backend copies the bundle into the worker's own /tmp, a
    # container reaches it through a bind mount of its directory.
    path = f"/var/tmp/egress-test-{os.getpid()}{ext}"
    with open(path, "w") as f:
        f.write(textwrap.dedent(source))
    os.chmod(path, 0o644)
    try:
        return await execute_once(runtime, path, args=args or {}, timeout=20, isolation=isolation.removesuffix("-exec"),
                                  memory_mb=256, permissions={"net": list(net), "net_private": list(net_private)},
                                  egress_nameserver=f"127.0.0.1:{world.dns_port}", container={"uid": UID_BASE},
                                  process={"uid_base": UID_BASE, "fork_server": not isolation.endswith("-exec")})
    finally:
        os.unlink(path)


PYTHON_PROBE = """
import socket

def attempt(family, address, proto=0):
    s = socket.socket(family, socket.SOCK_STREAM, proto)
    s.settimeout(3)
    try:
        s.connect(address)
        data = s.recv(100).decode()
        return data or "connected, no data"
    except OSError as e:
        return type(e).__name__
    finally:
        s.close()

def resolve(name):
    try:
        return sorted({i[4][0] for i in socket.getaddrinfo(name, 443, type=socket.SOCK_STREAM)})
    except OSError as e:
        return type(e).__name__

def main(args):
    v4, v6 = socket.AF_INET, socket.AF_INET6
    out = {
        "api": attempt(v4, ("api.test", 443)),
        "api6": attempt(v6, ("api.test", 443)),
        "api6_literal": attempt(v6, ("fd09::2", 443)),  # handed out by now: the line above resolved it
        "api_8443": attempt(v4, ("10.9.0.2", 8443)),
        "other_host": attempt(v4, ("10.9.0.3", 443)),
        "other_name": attempt(v4, ("other.test", 443)),
        "lan": attempt(v4, ("10.9.0.4", 443)),
        "lan6": attempt(v6, ("fd09::4", 443)),
        "lan_mapped": attempt(v6, ("::ffff:10.9.0.4", 443)),
        "metadata": attempt(v4, ("169.254.169.254", 443)),
        "metadata_mapped": attempt(v6, ("::ffff:169.254.169.254", 443)),
        "metadata_nat64": attempt(v6, ("64:ff9b::a9fe:a9fe", 443)),
        "loopback": attempt(v4, ("127.0.0.1", 443)),
        "loopback6": attempt(v6, ("::1", 443)),
        "mptcp_loopback": attempt(v4, ("127.0.0.1", 8443), 262),
        "mptcp_lan": attempt(v4, ("10.9.0.4", 443), 262),
        "resolve_api": resolve("api.test"),
        "resolve_other": resolve("other.test"),
    }
    for name in args.get("names", []):
        out["resolve " + name] = resolve(name)
        out["connect " + name] = attempt(v4, (name, 443))
    u = socket.socket(v4, socket.SOCK_DGRAM)
    for host, port in (("10.9.0.4", 9999), ("10.9.0.3", 53), ("169.254.169.254", 53)):
        try:
            u.sendto(b"secret.exfil.test", (host, port))
        except OSError:
            pass
    q = bytes.fromhex("abcd01000001000000000000") + b"".join(
        bytes([len(p)]) + p.encode() for p in "secret.api.test".split(".")) + b"\\x00\\x00\\x01\\x00\\x01"
    try:
        u.sendto(q, ("10.9.0.4", 53))
    except OSError:
        pass
    for proto in (0, 262):  # a listener, plain TCP and MPTCP, on a port of its own choosing
        try:
            s = socket.socket(v4, socket.SOCK_STREAM, proto)
            if proto:
                s.bind(("0.0.0.0", 0))
            s.listen()
            out.setdefault("listening", []).append(s.getsockname()[1])
            globals().setdefault("keep", []).append(s)
        except OSError as e:
            out["listen " + str(proto)] = type(e).__name__
    return out
"""


@pytest.mark.vm
async def test_a_grant_of_one_host_reaches_that_host_only(isolation, world):
    """Granted api.test:443 (and the operator's net_private for its address): it reaches exactly
    that, over IPv4 and IPv6, and nothing else: not another host on 443, not the LAN or the
    metadata host over IPv4, IPv6, IPv4-mapped or NAT64 forms, not the runner's loopback (plain
    or MPTCP), not UDP, not DNS to another resolver; it cannot be connected to."""
    r = await run(world, "python", PYTHON_PROBE, ["api.test:443"], ["10.9.0.2/32", "fd09::2/128"], isolation=isolation)
    assert r.success, r
    d = r.data
    assert d["api"] == "hello from ::ffff:10.9.0.2"
    assert d["api6"] == "hello from fd09::2"
    assert d["resolve_api"] == ["10.9.0.2", "fd09::2"]
    assert d["resolve_other"] == "gaierror"  # a name not granted does not resolve
    for key in ("api_8443", "other_host", "other_name", "lan", "lan6", "lan_mapped", "metadata", "metadata_mapped",
                "metadata_nat64", "loopback", "loopback6", "mptcp_loopback", "mptcp_lan"):
        assert not d[key].startswith("hello"), (key, d[key])
    assert d["other_name"] == "gaierror"
    assert d["mptcp_loopback"] == "ConnectionRefusedError"  # no listener on 8443 in its namespace
    assert d["api6_literal"] == "hello from fd09::2"
    egress = r.egress  # the request's own figures, for the result's metrics and /metrics
    assert egress.connections == 3 and egress.refused == 10 and egress.bytes_in == len("hello from ::ffff:10.9.0.2") + 2 * len("hello from fd09::2")
    assert world.reached == ["10.9.0.2", "fd09::2", "fd09::2"]
    assert world.datagrams == []  # no UDP, no DNS to another resolver, left the worker's namespace
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as control:
        control.sendto(b"control", ("10.9.0.4", 9999))
    await asyncio.sleep(0.05)
    assert world.datagrams == [("::ffff:10.9.0.4", 9999)]  # the sink does hear what reaches it
    # A listener is refused by the process backend's seccomp allowlist; where one is made (a
    # container), it is in the worker's own namespace, which nothing outside reaches.
    assert all(d.get(f"listen {proto}") == "PermissionError" for proto in (0, 262)) or len(d["listening"]) == 2, d
    for port in d.get("listening", []):
        for host in ("127.0.0.1", "10.9.0.2"):
            with pytest.raises(OSError):
                socket.create_connection((host, port), timeout=1).close()


BULK_PROBE = """
import socket, time

def main(args):
    s = socket.create_connection(("api.test", 8080), timeout=30)
    s.sendall(b"u" * (2 << 20))
    s.shutdown(socket.SHUT_WR)
    got = bytearray()
    while chunk := s.recv(1 << 16):
        got += chunk
    head, _, body = bytes(got).partition(b"\\n")
    f = socket.create_connection(("api.test", 8081), timeout=30)
    time.sleep(2)  # reads nothing of the flood, then 1 MiB of it: the stream is still whole
    flood = 0
    try:
        while flood < (1 << 20) and (chunk := f.recv(1 << 16)):
            flood += len(chunk)
    except OSError as e:
        flood = type(e).__name__
    f.close()
    return {"counted": int(head), "body": len(body), "flood": flood}
"""


@pytest.mark.vm
async def test_a_microvm_stream_carries_megabytes_and_a_reader_that_stops_stops_the_sender(vm_guest, world):
    """Through the guest's relay (a window per direction): 2 MiB up and 4 MiB down arrive whole;
    a server flooding a bundle that reads nothing gets only what the path's buffers hold into
    its socket, not the runner's memory (without the windows the runner takes all of it), and
    the stream is whole when the bundle reads it after all."""
    from atrund.execute.microvm import guest_init, relay

    assert guest_init.WINDOW == relay.WINDOW  # the two ends' windows must agree
    r = await run(world, "python", BULK_PROBE, ["api.test:8080", "api.test:8081"], ["10.9.0.2/32"],
                  isolation="microvm")
    assert r.success, r
    assert r.data["counted"] == 2 << 20 and r.data["body"] == 4 << 20, r.data
    assert r.data["flood"] >= 1 << 20, r.data  # not reset: the runner kept to the guest's window
    assert world.flooded < 32 << 20, world.flooded  # the rest waits in the server, not in the runner
    assert r.egress.connections == 2 and r.egress.bytes_out == 2 << 20
    assert r.egress.bytes_in >= (4 << 20) + len(f"{2 << 20}\n")


async def test_granted_names_that_resolve_to_private_addresses_are_refused(world):
    """Rebinding: a granted name whose answer is loopback, link-local or a LAN address (also as
    an IPv4-mapped AAAA) is answered with no address, and its address is not reachable either."""
    names = ["rebind.test", "meta.test", "lan.test", "mapped.test"]
    r = await run(world, "python", PYTHON_PROBE, names, args={"names": names})
    assert r.success, r
    for name in names:
        assert r.data["resolve " + name] == "gaierror", (name, r.data)
        assert not r.data["connect " + name].startswith("hello")
    assert not r.data["api"].startswith("hello")  # not granted here
    assert world.reached == [] and world.datagrams == []


async def test_the_private_range_needs_the_operator(world):
    """The same grant without net_private: api.test's address is private, so nothing is reached."""
    r = await run(world, "python", PYTHON_PROBE, ["api.test:443"])
    assert r.success, r
    assert r.data["resolve_api"] == "gaierror" and not r.data["api"].startswith("hello")
    assert world.reached == []


@pytest.mark.vm
async def test_no_grant_reaches_nothing(isolation, world):
    r = await run(world, "python", PYTHON_PROBE, [], isolation=isolation)
    assert r.success, r
    assert all(not str(v).startswith("hello") for v in r.data.values())
    assert r.data["resolve_api"] == "gaierror"
    assert world.reached == [] and world.datagrams == []


NODE_PROBE = """
import net from "node:net";
const attempt = (host, port) => new Promise((resolve) => {
  const s = net.connect({ host, port, timeout: 3000 });
  let data = "";
  s.on("data", (d) => { data += d; });
  s.on("end", () => resolve(data || "connected, no data"));
  s.on("timeout", () => { s.destroy(); resolve("timeout"); });
  s.on("error", (e) => resolve(e.code || e.name));
});
export async function main() {
  const out = {};
  for (const [k, h] of [["api", "api.test"], ["other", "10.9.0.3"], ["lan", "10.9.0.4"], ["lan6", "fd09::4"],
                        ["lan_mapped", "::ffff:10.9.0.4"], ["metadata", "169.254.169.254"], ["loopback", "127.0.0.1"],
                        ["rebind", "rebind.test"]]) {
    out[k] = await attempt(h, 443);
  }
  return out;
}
"""

DENO_PROBE = """
export async function main() {
  const out: Record<string, string> = {};
  for (const [k, h] of [["api", "api.test"], ["other", "10.9.0.3"], ["lan", "10.9.0.4"], ["lan6", "fd09::4"],
                        ["metadata", "169.254.169.254"], ["loopback", "127.0.0.1"], ["rebind", "rebind.test"]]) {
    try {
      const c = await Deno.connect({ hostname: h, port: 443 });
      const buf = new Uint8Array(100);
      const n = await c.read(buf);
      out[k] = new TextDecoder().decode(buf.subarray(0, n ?? 0));
      c.close();
    } catch (e) { out[k] = e.name; }
  }
  return out;
}
"""


async def test_node_is_held_as_python_is(world):
    r = await run(world, "node", NODE_PROBE, ["api.test:443", "rebind.test:443"], ["10.9.0.2/32"])
    assert r.success, r
    assert r.data["api"] == "hello from ::ffff:10.9.0.2"
    assert all(not v.startswith("hello") for k, v in r.data.items() if k != "api"), r.data
    assert world.reached == ["10.9.0.2"]


async def test_deno_is_held_as_python_is(world):
    """Deno: granted api.test:443 and the operator's range for it, exactly api.test is reached
    (Deno's own --deny-net is cut around netPrivate as the proxy is); granted "*" without it,
    none of the private hosts."""
    r = await run(world, "deno", DENO_PROBE, ["api.test:443", "rebind.test:443"], ["10.9.0.2/32"])
    assert r.success, r
    assert r.data["api"] == "hello from ::ffff:10.9.0.2"
    assert all(not v.startswith("hello") for k, v in r.data.items() if k != "api"), r.data
    assert world.reached == ["10.9.0.2"]
    r = await run(world, "deno", DENO_PROBE, ["*"])
    assert r.success, r
    assert all(not v.startswith("hello") for v in r.data.values()), r.data
    assert world.reached == ["10.9.0.2"]


@pytest.mark.vm
@pytest.mark.parametrize("runtime, probe", [("node", NODE_PROBE), ("deno", DENO_PROBE)])
async def test_node_and_deno_in_a_microvm_are_held_as_python_is(vm_guest, world, runtime, probe):
    """The guest's relay is the same for every runtime: exactly the granted host is reached."""
    r = await run(world, runtime, probe, ["api.test:443", "rebind.test:443"], ["10.9.0.2/32"], isolation="microvm")
    assert r.success, r
    assert r.data["api"] == "hello from ::ffff:10.9.0.2"
    assert all(not v.startswith("hello") for k, v in r.data.items() if k != "api"), r.data
    assert world.reached == ["10.9.0.2"]


@pytest.mark.parametrize("address, private_ok", [
    ("93.184.215.14", None), ("2606:4700::1111", None),
    ("127.0.0.1", False), ("10.1.2.3", False), ("172.16.0.1", False), ("192.168.1.1", False), ("100.64.0.1", False),
    ("169.254.169.254", False), ("224.0.0.251", False), ("0.0.0.0", False), ("255.255.255.255", False),
    ("::1", False), ("fd00::1", False), ("fe80::1", False), ("ff02::1", False), ("::", False),
    ("::ffff:127.0.0.1", False), ("::ffff:169.254.169.254", False), ("64:ff9b::a9fe:a9fe", False),
    ("64:ff9b::7f00:1", False), ("2002:a9fe:a9fe::1", False), ("::ffff:93.184.215.14", None),
])
def test_every_form_of_a_private_address_is_refused(address, private_ok):
    """The proxy's address rule (pure): a public address passes; a private one, in any form
    (IPv4-mapped, NAT64, 6to4), is refused unless net_private holds it, in any of its forms."""
    import ipaddress

    from atrund.execute.egress.policy import Grants

    ip = ipaddress.ip_address(address)
    assert (Grants(["*"]).refused(ip) is None) is (private_ok is None)
    if private_ok is False:
        assert Grants(["*"], ["0.0.0.0/0", "::/0"]).refused(ip) is None  # the operator's ranges open it


@pytest.mark.parametrize("grant, name, ports", [
    ("api.example.com", "api.example.com", {80, 443}), ("api.example.com:8443", "api.example.com", {8443}),
    ("api.example.com", "x.api.example.com", set()), ("*.example.com", "example.com", {80, 443}),
    ("*.example.com", "a.b.example.com", {80, 443}), ("*.example.com", "badexample.com", set()),
    ("*", "anything.test", {80, 443}), ("API.Example.com.", "api.example.com", {80, 443}),
    ("10.0.0.1:5432", "10.0.0.1", set()),
])
def test_grants_mean_what_the_lexicon_says(grant, name, ports):
    from atrund.execute.egress.policy import Grants

    assert Grants([grant]).name_ports(name) == ports


def test_literal_grants_name_addresses_in_every_form():
    import ipaddress

    from atrund.execute.egress.policy import Grants

    g = Grants(["10.0.0.1:5432", "[2001:db8::1]:8443", "localhost:3000", "192.0.2.0/24"])
    assert g.address_ports(ipaddress.ip_address("10.0.0.1")) == {5432}
    assert g.address_ports(ipaddress.ip_address("::ffff:10.0.0.1")) == {5432}
    assert g.address_ports(ipaddress.ip_address("2001:db8::1")) == {8443}
    assert g.address_ports(ipaddress.ip_address("::1")) == {3000}
    assert g.address_ports(ipaddress.ip_address("192.0.2.77")) == {80, 443}
    assert g.address_ports(ipaddress.ip_address("10.0.0.2")) == frozenset()
    assert g.ports == [80, 443, 3000, 5432, 8443]


async def test_a_relayed_connection_is_checked_as_an_accepted_one():
    """The seam a microVM's relay uses (Egress.relay and Egress.answer: the guest names the
    destination and sends its resolver's queries as bytes): only an address the answer handed
    out for a granted name, on that name's port, gets through, counted; the rest are resets."""
    import ipaddress

    from atrund.execute.egress.dns import Resolver
    from atrund.execute.egress.policy import Grants
    from atrund.execute.egress.proxy import Egress

    server = socket.create_server(("127.0.0.1", 0))
    server.settimeout(10)
    port = server.getsockname()[1]
    egress = Egress(Grants([f"*.localhost:{port}"], ["127.0.0.0/8", "::1/128"]), Resolver())
    reached = []

    def serve():
        conn, _ = server.accept()
        with conn:
            reached.append(conn.recv(5))
            conn.sendall(b"world")

    loop = asyncio.get_running_loop()
    served = loop.run_in_executor(None, serve)

    async def attempt_relay(address, to_port):
        mine, theirs = socket.socketpair()
        egress.relay(theirs, ipaddress.ip_address(address), to_port)
        mine.settimeout(5)
        try:
            await loop.run_in_executor(None, mine.sendall, b"hello")
            return await loop.run_in_executor(None, mine.recv, 5)
        except (ConnectionResetError, BrokenPipeError):
            return None
        finally:
            mine.close()

    def refused(answer):  # a Unix socket pair knows no reset: a refusal is its end, before any byte
        return answer in (None, b"")

    try:
        assert refused(await attempt_relay("127.0.0.1", port))  # not handed out yet: refused
        assert await egress.answer(b"not dns") is None
        nx = dns.message.from_wire(await egress.answer(dns.message.make_query("other.test", "A").to_wire()))
        assert nx.rcode() == 3 and not nx.answer  # NXDOMAIN: not granted
        a = dns.message.from_wire(await egress.answer(dns.message.make_query("localhost", "A").to_wire()))
        assert [r.address for rrset in a.answer for r in rrset] == ["127.0.0.1"]
        assert refused(await attempt_relay("127.0.0.1", port + 1 if port < 65535 else port - 1))  # port not granted
        assert refused(await attempt_relay("127.0.0.2", port))  # an address not handed out
        assert await attempt_relay("127.0.0.1", port) == b"world"
        await served
        assert reached == [b"hello"]
        await egress.settled()
        for _ in range(100):  # a pump counts a chunk just after handing it on
            if (counts := egress.counts.snapshot()).bytes_in == counts.bytes_out == 5:
                break
            await asyncio.sleep(0.01)
        assert (counts.connections, counts.refused, counts.bytes_out, counts.bytes_in) == (1, 3, 5, 5)
    finally:
        await egress.close()
        server.close()
