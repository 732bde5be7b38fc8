"""AT-native trust, and the access policy kept current while the runner serves.

``follows`` mode serves the accounts an operator account follows (its app.bsky.graph.follow
records); ``list`` mode the members of an app.bsky.graph.list (the app.bsky.graph.listitem
records in the list owner's repo whose ``list`` is that list's AT URI). Both are read from the
owner's own PDS with com.atproto.repo.listRecords, so no AppView is needed, and re-read every
``access.refresh_interval`` seconds: an unfollow or a removal from the list ends access at the
next refresh. A read that fails keeps the last set it had (a PDS outage must not lock everyone
out, nor let anyone in), and is retried sooner.

``LiveAccess`` is what the daemon consults: the configuration's lists, the operator's live
edits (the policy file, or the shared database's policy with ``[state] url``: re-read within a
second of ``atrund access allow|deny`` changing it, on every replica) and the trusted set.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

import structlog

from atrund.access import AccessPolicy, PolicyEntries, PolicyFile, StoredPolicy, effective
from atrund.atproto.repos import Repos
from atrund.atproto.uri import AtUri
from atrund.errors import AtrundError, ConfigError, IdentityError, TrustUnavailable

log = structlog.get_logger("atrund.trust")

FOLLOW = "app.bsky.graph.follow"
LISTITEM = "app.bsky.graph.listitem"
PAGE = 100
MAX_PAGES = 1000  # 100,000 follows or list items
FILE_CHECK_SECONDS = 1.0
RETRY_SECONDS = 30.0  # after a failed read of the follows or the list (or sooner, if the interval is shorter)


async def _subjects(repos: Repos, did: str, collection: str, keep: Callable[[dict], bool]) -> frozenset[str]:
    """The ``subject`` DIDs of every record in a collection of ``did``'s repo that ``keep`` accepts."""
    out: set[str] = set()
    cursor = None
    for _ in range(MAX_PAGES):
        records, cursor = await repos.list_records(did, collection, cursor=cursor, limit=PAGE)
        if not isinstance(records, list):
            raise TrustUnavailable(f"listRecords of {collection} in {did}: the PDS answered without a list of records")
        for rec in records:
            value = rec.get("value") if isinstance(rec, dict) else None
            subject = value.get("subject") if isinstance(value, dict) else None
            if isinstance(subject, str) and subject.startswith("did:") and keep(value):
                out.add(subject)
        if not cursor or len(records) < PAGE:
            return frozenset(out)
    log.warning("trust source truncated: too many records", repo=did, collection=collection, read=MAX_PAGES * PAGE)
    return frozenset(out)


async def resolve_dids(repos: Repos, pds: str | None, key: str, values: list[str]) -> list[str]:
    """``values`` (the configuration's ``key``) with each handle replaced by its DID, resolved
    through ``pds`` and verified both ways (the DID document claims the handle back); ConfigError
    naming the key if one does not resolve."""
    out = []
    for who in values:
        if who.startswith("did:"):
            out.append(who)
            continue
        if pds is None:
            raise ConfigError(f"{key}: {who!r} is a handle, and there is no PDS to resolve it through")
        try:
            out.append(await repos.identities.did_for_handle(who.lower().removeprefix("@"), pds))
        except IdentityError as e:
            raise ConfigError(f"{key}: {e}") from None
    return out


async def resolve_section(section, repos: Repos, pds: str | None):
    """``section`` (the [access] configuration) with the handles in allowlist, blocklist and
    operator resolved (resolve_dids)."""
    update: dict = {key: await resolve_dids(repos, pds, f"access.{key}", getattr(section, key))
                    for key in ("allowlist", "blocklist")}
    if section.operator is not None:
        [update["operator"]] = await resolve_dids(repos, pds, "access.operator", [section.operator])
    return section.model_copy(update=update)


async def follows(repos: Repos, operator: str) -> frozenset[str]:
    """The DIDs ``operator`` follows."""
    return await _subjects(repos, operator, FOLLOW, lambda v: True)


async def list_members(repos: Repos, list_uri: str) -> frozenset[str]:
    """The members of the app.bsky.graph.list at ``list_uri`` (read from its owner's repo)."""
    owner = AtUri.parse(list_uri).did
    return await _subjects(repos, owner, LISTITEM, lambda v: v.get("list") == list_uri)


class LiveAccess:
    """The access policy in force, with the same ``allows``/``mode`` as AccessPolicy."""

    def __init__(self, section, policy_file: PolicyFile | StoredPolicy, repos: Repos) -> None:
        self.section = section
        self.file = policy_file  # the live edits: a file, or the shared store's policy
        self.repos = repos
        self.source: str | None = None  # the operator DID (follows) or list AT URI (list)
        self.trusted: frozenset[str] = frozenset()
        self.failing: str | None = None  # why the trust source could not be read last time (/healthz)
        self.trust_read_at: float | None = None  # monotonic time of the last successful read
        self._entries = PolicyEntries()
        self._stamp: object = None
        self.current: AccessPolicy = effective(section, self._entries)
        self.on_change: Callable[[AccessPolicy], None] | None = None
        self._next_trust = 0.0
        self._runner_did: str | None = None
        self._pds: str | None = None

    @property
    def mode(self) -> str:
        return self.section.mode

    def allows(self, did: str) -> bool:
        return self.current.allows(did)

    def served(self) -> list[str]:
        return self.current.served()

    async def start(self, runner_did: str, pds: str | None = None) -> None:
        """Resolve the handles the configuration names (through ``pds``), then read the policy
        file and the trust source once, before serving."""
        self._runner_did, self._pds = runner_did, pds
        await self._configure(self.section)
        self.reload_file()
        await self._refresh_when_due()
        self._rebuild()

    async def reconfigure(self, section) -> None:
        """Apply a changed [access] section while serving (the configuration file was edited):
        its handles resolved, the trust source re-read now if it is another one. A section whose
        handles do not resolve raises ConfigError and changes nothing."""
        before = (self.mode, self.source)
        await self._configure(section)
        if (self.mode, self.source) != before:
            self.trusted = frozenset()
            if self.source is not None:
                await self._refresh_when_due()
        self._rebuild()

    async def _configure(self, section) -> None:
        self.section = await resolve_section(section, self.repos, self._pds)
        if self.mode == "follows":
            self.source = self.section.operator or self._runner_did
        elif self.mode == "list":
            self.source = self.section.list_uri
        else:
            self.source = None

    async def _refresh_when_due(self) -> bool:
        """Read the trust source and schedule the next read: after the interval, or sooner if
        this one failed."""
        interval = self.section.refresh_interval
        try:
            changed = await self.refresh_trust()
        except TrustUnavailable as e:
            self._next_trust = time.monotonic() + min(interval, RETRY_SECONDS)
            self.failing = f"the trust source ({self.mode} of {self.source}) cannot be read: {e}"
            return False
        self._next_trust = time.monotonic() + interval
        self.failing = None
        return changed

    def reload_file(self) -> bool:
        """Re-read the policy file (or the shared store's policy) if it changed; True if its
        entries did. One that cannot be read or does not parse keeps the previous entries in
        force (and says why)."""
        try:
            stamp = self.file.stamp()
        except (OSError, AtrundError) as e:
            log.error("access policy cannot be checked; the previous entries stay in force", file=self.file.where,
                      error=e.strerror if isinstance(e, OSError) else str(e))
            return False
        if stamp == self._stamp:
            return False
        self._stamp = stamp
        try:
            entries = self.file.read()
        except AtrundError as e:
            log.error("access policy file not applied; the previous entries stay in force", error=str(e))
            return False
        changed = entries != self._entries
        self._entries = entries
        return changed

    async def refresh_trust(self) -> bool:
        """Re-read the follows or the list; True if the trusted set changed."""
        if self.source is None:
            return False
        try:
            if self.mode == "follows":
                trusted = await follows(self.repos, self.source)
            else:
                trusted = await list_members(self.repos, self.source)
        except Exception as e:  # whatever a PDS does, the policy loop must not end: keep the last set, retry
            detail = str(e) if isinstance(e, AtrundError) else f"{type(e).__name__}: {e}"
            log.warning("could not read the trust source; keeping the last known set", mode=self.mode, source=self.source,
                        error=detail, known=len(self.trusted))
            raise TrustUnavailable(detail) from e
        self.trust_read_at = time.monotonic()
        changed = trusted != self.trusted
        if changed:
            log.info("trust source read", mode=self.mode, source=self.source, members=len(trusted),
                     added=len(trusted - self.trusted), removed=len(self.trusted - trusted))
        self.trusted = trusted
        return changed

    def _rebuild(self) -> None:
        before = self.current
        self.current = effective(self.section, self._entries, self.trusted)
        if self.current != before and self.on_change is not None:
            self.on_change(self.current)

    async def run(self) -> None:
        """Keep the policy current: the file within a second, the trust source every interval."""
        while True:
            changed = self.reload_file()
            if self.source is not None and time.monotonic() >= self._next_trust:
                changed = await self._refresh_when_due() or changed
            if changed:
                self._rebuild()
            await asyncio.sleep(FILE_CHECK_SECONDS)
