"""The runner's reads against a PLC and PDSes at private addresses: run by test_private_addresses
inside a network (and mount) namespace of its own, which has only ``lo``.

That namespace's ``lo`` holds, besides 127.0.0.1: PUBLIC (it stands for a public host; nothing
leaves the namespace, so it reaches no one), a "LAN" host at 10.9.9.9 and a "metadata" host at
169.254.169.254; its /etc/hosts names plc.test, pds.test and hop.test at PUBLIC and rebind.test
at 127.0.0.1. One HTTP server on every address plays the PLC directory and every PDS, and records
which local address each request reached. Prints one JSON object: per case, what a guarded
reader and an allowing one got, and which addresses each reached.
"""

from __future__ import annotations

import asyncio
import json
import sys

from aiohttp import web

from atrund.atproto import addresses
from atrund.atproto.identity import Identities
from atrund.atproto.repos import Repos
from atrund.errors import AtrundError

PUBLIC = "1.2.3.4"
KEY = "zQ3shXjHeiBuRCKmM36cuYnm7YEMzhGnCmCyW92sRJ9pribSF"  # a valid K-256 public key (multibase)
CID = "bafyreie5737gdxlw5i64vzichcalba3z2v5n6icifvx5xytvske7mr3hpm"


async def main(port: int) -> None:
    reached: list[str] = []
    pds = {  # DID -> its PDS URL (the document's #atproto_pds)
        "did:plc:public": f"http://pds.test:{port}",
        "did:plc:loopback": f"http://127.0.0.1:{port}",
        "did:plc:lan": f"http://10.9.9.9:{port}",
        "did:plc:metadata": f"http://169.254.169.254:{port}",
        "did:plc:mapped": f"http://[::ffff:169.254.169.254]:{port}",
        "did:plc:rebind": f"http://rebind.test:{port}",
        "did:plc:hop": f"http://hop.test:{port}",  # a public PDS whose answer redirects to loopback
    }

    async def doc(request: web.Request) -> web.Response:
        did = request.match_info["did"]
        return web.json_response({
            "id": did, "alsoKnownAs": ["at://someone.test"],
            "verificationMethod": [{"id": f"{did}#atproto", "type": "Multikey", "controller": did, "publicKeyMultibase": KEY}],
            "service": [{"id": "#atproto_pds", "type": "AtprotoPersonalDataServer", "serviceEndpoint": pds[did]}]})

    async def get_record(request: web.Request) -> web.Response:
        reached.append(request.transport.get_extra_info("sockname")[0])
        if request.host.startswith("hop.test"):
            raise web.HTTPFound(f"http://127.0.0.1:{port}{request.path_qs}")
        return web.json_response({"uri": "at://x/y/z", "cid": CID, "value": {"reached": True}})

    app = web.Application()
    app.router.add_get("/xrpc/com.atproto.repo.getRecord", get_record)
    app.router.add_get("/{did}", doc)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "0.0.0.0", port).start()

    async def attempt(plc: str, did: str, allow: bool) -> dict:
        reached.clear()
        repos = Repos(Identities(plc, timeout=5, allow_private_addresses=allow))
        try:
            await repos.get_record(did, "dev.atrun.bundle", "x")
            got = "ok"
        except AtrundError as e:
            got = f"{type(e).__name__}: {e}"
        finally:
            await repos.close()
        return {"got": got, "reached": list(reached)}

    out: dict = {}
    for did in pds:
        out[did] = {"guarded": await attempt(f"http://plc.test:{port}", did, False),
                    "allowed": await attempt(f"http://plc.test:{port}", did, True)}
    out["loopback plc"] = {"guarded": await attempt(f"http://127.0.0.1:{port}", "did:plc:public", False),
                           "allowed": await attempt(f"http://127.0.0.1:{port}", "did:plc:public", True)}
    relay = {}
    for host in ("pds.test", "rebind.test", "10.9.9.9"):
        try:
            (await addresses.open_stream_socket(host, port, 5)).close()
            relay[host] = "ok"
        except AtrundError as e:
            relay[host] = f"{type(e).__name__}: {e}"
    out["relay"] = relay
    await runner.cleanup()
    print(json.dumps(out))


if __name__ == "__main__":
    asyncio.run(main(int(sys.argv[1])))
