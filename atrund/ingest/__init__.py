"""Ingest: how invocation records reach the runner (polling now; a firehose later).

Every source hands records to ``classify``, so what counts as "ours" and "allowed" is decided
in one place whatever the source.
"""

from __future__ import annotations

from typing import Any

from atrund.access import AccessPolicy


def classify(uri: str, value: Any, runner_did: str, policy: AccessPolicy) -> str | None:
    """``pending`` (run it), ``denied`` (the author may not use this runner) or None (not ours).

    An invocation is ours when its ``runner`` field is our DID; a record without a readable
    runner field cannot be addressed to us, so it is ignored rather than answered.
    """
    if not isinstance(value, dict) or value.get("runner") != runner_did:
        return None
    author = uri.removeprefix("at://").split("/", 1)[0]
    return "pending" if policy.allows(author) else "denied"
