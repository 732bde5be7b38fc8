"""AT URIs of records, and TIDs: the one place either is parsed or made.

A record's AT URI is ``at://AUTHORITY/COLLECTION/RKEY``: the authority is the repo's DID (or,
in a URI a person typed, a handle), the collection an NSID, the record key a string without
``/``. Parsing is as lenient as the PDS is about the parts (any non-empty text without a slash)
and says exactly what is wrong when it refuses; the parts themselves are checked by whoever
uses them (the PDS refuses a bad record key, the access policy an unknown DID).

A TID is the record key most records get: 13 characters of base32-sortable (``2-7a-z``)
holding microseconds since the Unix epoch (53 bits, top bit zero) and a 10-bit clock id, so
that keys sort by creation time.
"""

from __future__ import annotations

import random
import re
import threading
import time
from dataclasses import dataclass

PREFIX = "at://"
TID_ALPHABET = "234567abcdefghijklmnopqrstuvwxyz"
TID = re.compile(r"[234567abcdefghij][234567abcdefghijklmnopqrstuvwxyz]{12}")


@dataclass(frozen=True)
class AtUri:
    """The AT URI of one record; ``str()`` gives it back as ``at://authority/collection/rkey``."""

    authority: str
    collection: str
    rkey: str

    @property
    def did(self) -> str:
        """The repo's DID (the authority of every URI the runner reads from a PDS or a stream)."""
        return self.authority

    @classmethod
    def parse(cls, text: object) -> AtUri:
        """The record URI ``text`` names; ValueError naming what is wrong with it."""
        if not isinstance(text, str):
            raise ValueError(f"{text!r} is not an AT URI of a record (at://DID/COLLECTION/RKEY): not a string")
        if not text.startswith(PREFIX):
            raise ValueError(f"{text!r} is not an AT URI of a record (at://DID/COLLECTION/RKEY): it does not start with at://")
        parts = text[len(PREFIX):].split("/")
        if len(parts) != 3:
            raise ValueError(f"{text!r} is not an AT URI of a record (at://DID/COLLECTION/RKEY): it has {len(parts)} "
                             f"part{'s' if len(parts) != 1 else ''} after at://, not 3")
        for name, part in zip(("authority (DID)", "collection", "record key"), parts, strict=True):
            if not part:
                raise ValueError(f"{text!r} is not an AT URI of a record (at://DID/COLLECTION/RKEY): its {name} is empty")
        return cls(*parts)

    @classmethod
    def of(cls, did: str, path: str) -> AtUri:
        """The URI of the record at repo ``path`` (``collection/rkey``, as a commit names it) in
        ``did``'s repo; ValueError if ``path`` is not exactly two non-empty parts."""
        return cls.parse(f"{PREFIX}{did}/{path}")

    def __str__(self) -> str:
        return f"{PREFIX}{self.authority}/{self.collection}/{self.rkey}"


def authority(uri: str) -> str:
    """The authority (repo DID) of a record URI; ValueError if ``uri`` is not one."""
    return AtUri.parse(uri).authority


def is_tid(text: object) -> bool:
    """Whether ``text`` is a TID (13 base32-sortable characters, top bit zero)."""
    return isinstance(text, str) and TID.fullmatch(text) is not None


_last = 0
_lock = threading.Lock()


def new_tid() -> str:
    """A fresh TID: microseconds now and a random clock id. Strictly increasing within this
    process (two keys made in the same microsecond still sort in the order they were made)."""
    global _last
    with _lock:
        n = max((int(time.time() * 1_000_000) << 10) | random.getrandbits(10), _last + 1)
        _last = n
    return "".join(TID_ALPHABET[(n >> (5 * i)) & 31] for i in reversed(range(13)))
