"""A counter with durable state: each call of `hit` adds one and answers the new count.

An endpoint that declares a second parameter gets `ctx`; `ctx.state` is this bundle's key-value
state on the runner (docs/protocol.md §7.6), shared by every run of the bundle, whoever invoked
it. Writes commit with the run's result, and only if the run succeeds.

    atrund bundle publish examples/counter.py --runtime python
    atrund invoke at://YOU/dev.atrun.bundle/RKEY --runner RUNNER --endpoint hit --wait
    atrund state get --runner RUNNER --bundle RKEY hits
"""


def hit(args, ctx):
    hits = (ctx.state.get("hits") or 0) + 1
    ctx.state.set("hits", hits)
    if args.get("name"):  # one key per name: list them with a prefix
        ctx.state.set("by/" + args["name"], hits)
    return {"hits": hits}


def names(args, ctx):
    page = ctx.state.list("by/", limit=100, cursor=args.get("cursor"))
    return {"names": [key[3:] for key in page["keys"]], "cursor": page["cursor"]}


def reset(args, ctx):
    ctx.state.delete("hits")
    return {"hits": 0}
