"""Bundle fetch and verification, with an on-disk cache keyed by CID.

What an invocation pins (a strongRef) is what runs, or nothing does: the bundle record must be
at exactly the pinned CID (proven by sync.getRecord's inclusion proof: the author's signed commit,
the MST path, the block's hash), and the code blob's bytes must hash to the blob CID the record
names. Only verified content is written to the cache, so a cache hit
needs no network and no re-check.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import structlog
from pydantic import ValidationError

from atrund import bounds
from atrund.atproto.lru import LRU
from atrund.atproto.repos import Repos
from atrund.atproto.uri import AtUri
from atrund.errors import BundleRefused, ContentMismatch, NotFound, ProofError, TooLarge, VersionGone
from atrund.records import BUNDLE, Bundle, StrongRef, field_errors

log = structlog.get_logger("atrund.bundles")

MEMORY_ENTRIES = 256  # verified bundles kept in memory (each a parsed record and a path)


@dataclass(frozen=True)
class VerifiedBundle:
    ref: StrongRef
    record: Bundle
    code_path: Path


def _write_atomic(path: Path, data: bytes) -> None:
    # The runner's alone (workers get a copy: execute/ stages it): no other uid may read the cache.
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".part-")
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.chmod(tmp, 0o400)
    os.replace(tmp, path)


class BundleStore:
    def __init__(self, repos: Repos, cache_dir: Path, max_bytes: int, extensions: dict[str, str] | None = None) -> None:
        self.repos = repos
        # Runtimes pick a module's kind by its file name (.ts, .mjs), so cached code carries the runtime's extension.
        self.extensions = extensions or {}
        self.records_dir = cache_dir / "records"
        self.blobs_dir = cache_dir / "blobs"
        self.max_bytes = max_bytes
        # What a (URI, CID) pair proves never changes: a hot bundle is parsed once, not per request.
        self._verified: LRU[tuple[str, str], VerifiedBundle] = LRU(MEMORY_ENTRIES)

    async def get(self, ref: StrongRef) -> VerifiedBundle:
        hit = self._verified.get((ref.uri, ref.cid))
        if hit is not None and hit.code_path.exists():  # the disk cache may have been cleared under us
            return hit
        uri = AtUri.parse(ref.uri)
        if uri.collection != BUNDLE:
            raise BundleRefused(f"bundle.uri names a {uri.collection} record, not a {BUNDLE}")
        record = self.parse(await self._record(uri, ref.cid))
        code_path = await self._blob(uri.did, record)
        verified = VerifiedBundle(ref=ref, record=record, code_path=code_path)
        self._verified.put((ref.uri, ref.cid), verified)
        return verified

    async def _record(self, uri: AtUri, cid: str) -> dict:
        # Keyed by URI and CID: a cached record proves what one repo held, not what another holds.
        uri_hash = hashlib.sha256(str(uri).encode()).hexdigest()[:32]
        cached = self.records_dir / f"{uri_hash}-{cid}.json"
        if cached.exists():
            return json.loads(cached.read_text())
        try:
            value = await self.repos.get_verified_record(uri.did, BUNDLE, uri.rkey, cid)
        except ContentMismatch as e:
            raise BundleRefused(f"bundle record: {e}") from None
        except ProofError as e:  # the PDS's answer is not the author's signed repo: doctored, or broken
            log.warning("bundle record refused: its PDS's answer does not prove it", bundle=str(uri), cid=cid, error=str(e))
            raise BundleRefused(f"bundle record: the PDS's answer does not prove it is {uri.did}'s: {e}") from None
        except NotFound:
            try:
                current, _ = await self.repos.get_record(uri.did, BUNDLE, uri.rkey)
            except NotFound:
                raise NotFound(f"bundle {uri} does not exist (deleted, or never published)") from None
            raise VersionGone(
                f"bundle CID mismatch: the invocation pins {cid}, but {uri} is now {current} "
                "(the bundle was changed after the invocation was made; invoke the new version by its CID)"
            ) from None
        _write_atomic(cached, json.dumps(value).encode())
        return value

    async def _blob(self, did: str, record: Bundle) -> Path:
        cid = record.code.cid  # validated as a canonical CID by the model: never a path
        path = self.blobs_dir / f"{cid}{self.extensions.get(record.runtime, '')}"
        if path.parent != self.blobs_dir:
            raise BundleRefused(f"bundle code names {cid!r}, which is not a CID")
        if path.exists():
            return path
        if record.code.size > self.max_bytes:
            raise BundleRefused(f"bundle code is {record.code.size} bytes, more than this runner's limit of {self.max_bytes}")
        try:
            data = await self.repos.get_blob(did, cid, self.max_bytes)
        except (TooLarge, ContentMismatch) as e:
            raise BundleRefused(f"bundle code: {e}") from None
        except NotFound:
            raise NotFound(f"bundle code blob {cid} is missing from {did}'s PDS") from None
        _write_atomic(path, data)
        return path

    @staticmethod
    def parse(value: dict) -> Bundle:
        try:
            return Bundle.model_validate(bounds.check_fields(value))
        except bounds.Malformed as e:
            raise BundleRefused(f"bundle record is invalid: {e}") from None
        except ValidationError as e:
            raise BundleRefused(f"bundle record is invalid: {field_errors(e)}") from None
