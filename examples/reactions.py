"""A bundle run by time and by records, not by invocations: a schedule ticks `tick`, a trigger
on likes of my posts fires `thanks`.

    atrund schedule create BUNDLE_URI --runner DID --endpoint tick --cron "0 9 * * *" --timezone Europe/Berlin
    atrund trigger create BUNDLE_URI --runner DID --endpoint thanks --collection app.bsky.feed.like --about-me --results all
"""


def tick(args):
    """The schedule's tick: args["schedule"] says which (uri, cid, scheduledAt)."""
    return {"ticked": args["schedule"]["scheduledAt"]}


def thanks(args):
    """A like of one of my posts: args["event"] is the like (uri, cid, action, author, record, time)."""
    event = args["event"]
    return {"thanks": event["author"], "for": event["record"]["subject"]["uri"], "action": event["action"]}
