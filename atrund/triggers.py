"""Triggers: dev.atrun.trigger records, fired by matching records on the firehose.

    firehose frame ─ an op path's collection followed? ─ no ─▶ skipped undecoded (as before)
                                     │ yes
         ops of a followed collection and action, by an author the trigger names (``wants``)
                                     │
         proven (signature + MST, atrund.ingest.firehose) ─▶ ``fire``: subject match
                                     │
         per-trigger gate: backlog (full: dropped, counted) ─▶ stored pending ─▶ released at
         the trigger's rate ─▶ atrund.runs (fairness, per-author limits, at most once)

The runner follows only the collections some live trigger names (``followed``): the firehose
reads the collection of each op path straight from a frame's bytes and looks it up in that set
(atrund.ingest.firehose ``op_collections``), so frames of every other collection stay on its
undecoded fast path, at a cost that does not grow with the number of triggers.

A firing is a row of ``invocations`` keyed by records.firing_key(trigger URI, event URI, event
CID): stored before it is queued, it runs at most once, and a replayed frame (a reconnect, a
restart) finds its key taken and fires nothing. It is released to atrund.runs no faster than
``[triggers] per_minute`` per trigger; the firings waiting for that (stored, so a restart runs
them) are the trigger's backlog, and one past ``[triggers] backlog`` is dropped and counted
(/metrics ``atrund_trigger_drops``, ``atrund status``). So a flood on one trigger costs its own
author's queue at most the backlog, and the other authors nothing (atrund.schedule serves
authors round-robin).
"""

from __future__ import annotations

import asyncio
import collections
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import structlog
from pydantic import ValidationError

from atrund import bounds
from atrund.access import AccessPolicy
from atrund.atproto.repos import Repos
from atrund.config import TriggersSection
from atrund.records import RESULT, TRIGGER, Trigger, field_errors, firing_key, now_iso
from atrund.standing import Standings
from atrund.state import Standing, Store

log = structlog.get_logger("atrund.triggers")

NSID = re.compile(r"^[a-zA-Z][a-zA-Z0-9-]{0,62}(\.[a-zA-Z0-9][a-zA-Z0-9-]{0,62})+\.[a-zA-Z][a-zA-Z0-9]{0,62}$")
ACTIONS = ("create", "update", "delete")
RESULTS = ("all", "errors", "none")
NEVER = {RESULT}  # a trigger on results would fire on its own results


@dataclass
class _Live:
    """One trigger as matching needs it."""

    item: Standing
    record: Trigger
    actions: frozenset[str]
    authors: frozenset[str] | None
    waiting: collections.deque[str] = field(default_factory=collections.deque)  # stored firings not yet released
    tokens: float = 0.0
    refilled: float = 0.0
    fired: int = 0
    dropped: int = 0


def points_at(value: Any, did: str) -> bool:
    """Whether a record points at ``did`` or one of its records: a subject (like, repost, follow,
    block), a reply's parent or root, an embedded record, or a mention facet."""
    if not isinstance(value, dict):
        return False
    prefix = f"at://{did}/"

    def ref(x: Any) -> bool:
        uri = x.get("uri") if isinstance(x, dict) else None
        return isinstance(uri, str) and uri.startswith(prefix)

    subject = value.get("subject")
    if subject == did or ref(subject):
        return True
    reply = value.get("reply")
    if isinstance(reply, dict) and (ref(reply.get("parent")) or ref(reply.get("root"))):
        return True
    embed = value.get("embed")
    if isinstance(embed, dict):
        inner = embed.get("record")
        if ref(inner) or (isinstance(inner, dict) and ref(inner.get("record"))):
            return True
    for facet in value.get("facets") or []:
        for feature in (facet.get("features") or []) if isinstance(facet, dict) else []:
            if isinstance(feature, dict) and feature.get("did") == did:
                return True
    return False


class Triggers:
    def __init__(self, state: Store, repos: Repos, policy: AccessPolicy, runner_did: str, submit: Callable[[str], None],
                 settings: TriggersSection) -> None:
        self.state, self.policy, self.runner_did, self.submit = state, policy, runner_did, submit
        self.settings = settings
        self.standings = Standings("trigger", TRIGGER, state, repos, runner_did, settings.max_per_author, self._problem)
        self.live: dict[str, _Live] = {}
        self.by_collection: dict[str, list[_Live]] = {}
        self.followed: frozenset[bytes] = frozenset()  # the collections triggers name, as the frames' bytes spell them
        self.fired = 0
        self.dropped = 0
        self._wake = asyncio.Event()
        for item in list(self.standings.items.values()):
            if self._problem(item.value) is None:
                self._take(item)
            else:
                self.standings.drop(item)
        self._index()

    # -- what the triggers are ------------------------------------------------------------

    def _problem(self, value: Any) -> str | None:
        try:
            record = Trigger.model_validate(bounds.check_fields(value))
        except ValidationError as e:
            return f"invalid trigger record: {field_errors(e)}"
        except bounds.Malformed as e:
            return f"invalid trigger record: {e}"
        for c in record.collections:
            if not NSID.match(c):
                return f"collections: {c!r} is not an NSID (no wildcards: name each collection)"
            if c in NEVER:
                return f"collections: {c} cannot fire a trigger (its own results would fire it again)"
        for name, given, allowed in (("actions", record.actions or [], ACTIONS), ("results", [record.results or "errors"], RESULTS),
                                     ("subject", [record.subject or "self"], ("self",))):
            bad = [x for x in given if x not in allowed]
            if bad:
                return f"{name}: {bad[0]!r} is not one of {', '.join(allowed)}"
        bad = [a for a in record.authors or [] if a != "self" and not a.startswith("did:")]
        if bad:
            return f"authors: {bad[0]!r} is neither a DID nor self"
        followed = set(self.by_collection) | set(record.collections)
        if len(followed) > self.settings.max_collections:
            return (f"this runner follows at most {self.settings.max_collections} collections for all triggers "
                    f"([triggers] max_collections); this trigger would make {len(followed)}")
        return None

    def _take(self, item: Standing) -> None:
        record = Trigger.model_validate(item.value)
        authors = None if record.authors is None else frozenset(item.author if a == "self" else a for a in record.authors)
        old = self.live.get(item.uri)
        live = _Live(item, record, frozenset(record.actions or ["create"]), authors, tokens=self._burst(),
                     refilled=time.monotonic())
        if old is not None:
            live.waiting, live.fired, live.dropped = old.waiting, old.fired, old.dropped
        self.live[item.uri] = live

    def _index(self) -> None:
        by: dict[str, list[_Live]] = {}
        for live in self.live.values():
            for c in live.record.collections:
                by.setdefault(c, []).append(live)
        self.by_collection = by
        self.followed = frozenset(c.encode() for c in by)

    def _burst(self) -> float:
        return max(1.0, self.settings.per_minute)

    async def sync(self, authors: list[str]) -> None:
        """One ingest round of trigger records (see atrund.standing)."""
        changed, gone = await self.standings.sync(authors, self.policy.allows)
        self.apply(changed, gone)

    def apply(self, changed: list[Standing], gone: list[Standing]) -> None:
        """Follow new and edited triggers (kept in the store), and stop the gone ones."""
        for item in changed:
            self.state.keep_standing("trigger", item)
            self._take(item)
            log.info("trigger taken", uri=item.uri, cid=item.cid, collections=item.value.get("collections"))
        for item in gone:
            self.live.pop(item.uri, None)
        if changed or gone:
            self._index()

    # -- matching (atrund.ingest.firehose asks) --------------------------------------------

    def wants(self, did: str, collection: str, action: str) -> bool:
        """Could an op of ``did`` on ``collection`` fire a trigger? Asked before any proof."""
        if did == self.runner_did:
            return False  # the runner's own writes (its results) never fire anything
        return any(action in t.actions and (t.authors is None or did in t.authors) for t in self.by_collection.get(collection, ()))

    def fire(self, did: str, uri: str, collection: str, action: str, cid: str | None, value: Any, when: Any) -> int:
        """A proven event: store and queue a firing of every trigger it matches; how many."""
        n = 0
        for t in self.by_collection.get(collection, ()):
            if action not in t.actions or (t.authors is not None and did not in t.authors):
                continue
            if t.record.subject == "self" and not points_at(value, t.item.author):
                continue
            if not self.policy.allows(t.item.author):
                continue
            n += self._admit(t, did, uri, action, cid, value, when)
        return n

    def _admit(self, t: _Live, did: str, uri: str, action: str, cid: str | None, value: Any, when: Any) -> int:
        if len(t.waiting) >= self.settings.backlog:
            t.dropped += 1
            self.dropped += 1
            if t.dropped == 1 or t.dropped % 1000 == 0:
                log.warning("trigger backlog full: firing dropped", trigger=t.item.uri, record=uri, dropped=t.dropped,
                            backlog=self.settings.backlog)
            return 0
        key = firing_key(t.item.uri, uri, cid)
        if not self.state.accept(key, t.item.author, t.item.cid, self._run_value(t, did, uri, action, cid, value, when)):
            return 0  # fired before (a replayed frame)
        t.waiting.append(key)
        t.fired += 1
        self.fired += 1
        self._wake.set()
        return 1

    def _run_value(self, t: _Live, did: str, uri: str, action: str, cid: str | None, value: Any, when: Any) -> dict[str, Any]:
        rec = t.record
        event = {"uri": uri, "cid": cid, "action": action, "author": did, "record": value,
                 "time": when if isinstance(when, str) else now_iso()}
        origin: dict[str, Any] = {"trigger": {"uri": t.item.uri, "cid": t.item.cid}, "event": uri,
                                  "results": rec.results or "errors"}
        if cid is not None:
            origin["eventCid"] = cid
        return {"runner": rec.runner, "bundle": rec.bundle.to_record(), "endpoint": rec.endpoint, "createdAt": now_iso(),
                "args": {**(rec.args or {}), "event": event}, "origin": origin}

    # -- release at each trigger's rate ---------------------------------------------------

    def release(self, now: float) -> float | None:
        """Queue the firings each trigger's rate allows now; seconds until the next is allowed."""
        rate = self.settings.per_minute / 60.0
        wait = None
        for t in list(self.live.values()):
            if not t.waiting:
                continue
            t.tokens = min(self._burst(), t.tokens + (now - t.refilled) * rate)
            t.refilled = now
            while t.waiting and t.tokens >= 1.0:
                t.tokens -= 1.0
                self.submit(t.waiting.popleft())
            if t.waiting:
                need = (1.0 - t.tokens) / rate
                wait = need if wait is None else min(wait, need)
        return wait

    async def run(self) -> None:
        while True:
            wait = self.release(time.monotonic())
            self._wake.clear()
            try:
                await asyncio.wait_for(self._wake.wait(), timeout=wait)
            except asyncio.TimeoutError:
                pass

    def figures(self) -> dict[str, Any]:
        return {**self.standings.figures(), "collections": len(self.by_collection), "fired": self.fired, "dropped": self.dropped,
                "waiting": sum(len(t.waiting) for t in self.live.values()),
                "by_trigger": {uri: {"fired": t.fired, "dropped": t.dropped, "waiting": len(t.waiting)}
                               for uri, t in self.live.items()}}
