"""Service-auth tokens: who is calling the runner's XRPC methods.

A caller asks its own PDS for a short-lived JWT (``com.atproto.server.getServiceAuth`` with
aud = the runner's DID and lxm = the method) and sends it as ``Authorization: Bearer``. The PDS
signs it with the caller's atproto signing key, so the token proves the caller's DID without
the runner ever seeing a password. A token is accepted only if all of these hold:

- three base64url parts; header ``alg`` ES256K or ES256, and the key's own algorithm;
- ``iss`` a DID (no service fragment), ``aud`` exactly the runner's DID, ``lxm`` exactly the
  method called, ``exp`` present and not past, ``iat`` present and not in the future, and a
  lifetime of at most an hour (what a PDS issues; it also bounds the replay memory below);
- the signature verifies against the ``#atproto`` key of the issuer's DID document (fetched
  once more, uncached, if it does not: keys rotate);
- ``jti`` not seen before.

Replay: a ``jti`` is used once (``UsedTokens``), and kept until its token expires. One runner
keeps them in memory (``SeenTokens``); a restart forgets them, so tokens issued before this
process started are refused as well: this process cannot have seen them, and the previous one
may have. (A caller just asks its PDS for a new token.) Replicas sharing a Postgres state keep
them in the database (atrund.pgstate, a unique key), so a token used on one replica is refused
by every other; tokens issued before the fleet began to keep them are refused there.
Signature checks run the SDK's atproto_crypto (low-S enforced, as atproto requires).
"""

from __future__ import annotations

import base64
import binascii
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from atproto_crypto.did import parse_did_key
from atproto_crypto.verify import verify_signature
from atproto_server.auth.jwt import decode_jwt_payload, parse_jwt
from atproto_server.exceptions import TokenDecodeError

from atrund import bounds
from atrund.atproto.identity import Identities
from atrund.errors import IdentityError, NotServed, ServiceAuthError

ALGORITHMS = {"ES256K", "ES256"}
MAX_LIFETIME = 3600  # seconds; a PDS issues method-bound tokens for at most an hour


@dataclass(frozen=True)
class Caller:
    did: str
    jti: str
    expires: int


class UsedTokens(Protocol):
    """Where single-use tokens' ``jti`` values are remembered."""

    def tokens_since(self) -> float:
        """Tokens issued before this (Unix time) may have been used unseen: they are refused."""
        ...

    def use_token(self, jti: str, until: float) -> bool:
        """Use ``jti``, acceptable until ``until``; False if it was used before."""
        ...


class SeenTokens:
    """One runner's memory of used tokens: this process's, until each token expires."""

    def __init__(self) -> None:
        self.started = int(time.time())
        self._seen: dict[str, float] = {}  # jti -> until
        self._pruned = 0.0

    def tokens_since(self) -> float:
        return self.started

    def use_token(self, jti: str, until: float) -> bool:
        now = time.time()
        if now - self._pruned > 30:  # at most every 30 s: a scan per call would be quadratic under load
            self._pruned = now
            for old in [j for j, t in self._seen.items() if t < now]:
                del self._seen[old]
        if jti in self._seen:
            return False
        self._seen[jti] = until
        return True


class ServiceAuth:
    def __init__(self, identities: Identities, audience: str, leeway: int = 5, tokens: UsedTokens | None = None) -> None:
        """``tokens``: where used tokens are remembered (default: in this process, ``SeenTokens``)."""
        self.identities = identities
        self.audience = audience
        self.leeway = leeway
        self.tokens = tokens if tokens is not None else SeenTokens()

    async def verify(self, authorization: str | None, method: str, admit: Callable[[str], bool] | None = None) -> Caller:
        """The caller a ``Bearer`` header proves, for ``method``; raises ServiceAuthError.

        ``admit``: the access policy. An issuer it refuses is refused (NotServed) before its DID
        document is fetched: resolving a did:web connects to the host it names, and an unlisted
        caller must not be able to make the runner do that."""
        if not authorization:
            raise ServiceAuthError("missing", "this method needs a service-auth token: Authorization: Bearer <JWT from "
                                              "com.atproto.server.getServiceAuth with aud = the runner's DID>")
        scheme, _, token = authorization.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise ServiceAuthError("malformed", "Authorization must be 'Bearer <JWT>'")
        _check_bounds(token.strip())
        try:
            payload_bytes, signing_input, header, signature = parse_jwt(token.strip())
            payload = decode_jwt_payload(payload_bytes)
        except TokenDecodeError as e:
            raise ServiceAuthError("malformed", f"token is not a JWT: {e}") from None
        alg = header.get("alg")
        if alg not in ALGORITHMS:
            raise ServiceAuthError("malformed", f"token alg {alg!r} is not one atproto signs with (ES256K, ES256)")
        iss = payload.iss or ""
        if not iss.startswith("did:") or "#" in iss:
            raise ServiceAuthError("malformed", f"token iss {iss!r} is not an account DID")
        if payload.aud != self.audience:
            raise ServiceAuthError("audience", f"token is for {payload.aud!r}, not this runner ({self.audience})")
        lxm = getattr(payload, "lxm", None)
        if lxm != method:
            raise ServiceAuthError("method", f"token is bound to method {lxm!r}, not {method}")
        now = time.time()
        if not isinstance(payload.exp, int) or not isinstance(payload.iat, int):
            raise ServiceAuthError("malformed", "token must carry exp and iat (integers)")
        if payload.exp <= now - self.leeway:
            raise ServiceAuthError("expired", f"token expired {int(now - payload.exp)} s ago")
        if payload.iat > now + self.leeway:
            raise ServiceAuthError("malformed", "token iat is in the future")
        if payload.exp - payload.iat > MAX_LIFETIME:
            raise ServiceAuthError("malformed", f"token lifetime {payload.exp - payload.iat} s is more than {MAX_LIFETIME} s")
        if payload.iat < self.tokens.tokens_since():
            raise ServiceAuthError("replayed", "token was issued before this runner started (its jti may have been used "
                                               "already); ask your PDS for a new one")
        if not payload.jti:
            raise ServiceAuthError("malformed", "token carries no jti (needed to refuse replays)")
        if admit is not None and not admit(iss):
            raise NotServed(iss)
        await self._check_signature(iss, alg, signing_input, signature)
        # One winner: the memory's check and insert are one step (no await; one INSERT in Postgres).
        if not self.tokens.use_token(payload.jti, payload.exp + self.leeway):
            raise ServiceAuthError("replayed", "token was already used (jti seen before); tokens are single-use")
        return Caller(did=iss, jti=payload.jti, expires=payload.exp)

    async def _check_signature(self, did: str, alg: str, signing_input: bytes, signature: bytes) -> None:
        for refresh in (False, True):
            try:
                key = await self.identities.signing_key(did, refresh=refresh)
            except IdentityError as e:
                raise ServiceAuthError("identity", f"cannot verify the token: {e}") from None
            if parse_did_key(key).jwt_alg != alg:  # parses: signing_key checked it
                ok = False  # a token must use its key's own algorithm
            else:
                try:
                    ok = verify_signature(key, signing_input, signature)
                except Exception:  # the SDK raises on malformed signatures; both mean "not signed by this key"
                    ok = False
            if ok:
                return
        raise ServiceAuthError("signature", f"token signature does not verify against {did}'s signing key")


def _check_bounds(token: str) -> None:
    """Refuse a token whose header or payload is not strict JSON nested at most bounds.MAX_DEPTH
    levels, naming the part and the limit (the SDK's own parser stops at 200 levels, with a
    message that names neither)."""
    for name, part in zip(("header", "payload"), token.split(".")[:2], strict=False):
        try:
            raw = base64.urlsafe_b64decode(part + "=" * (-len(part) % 4))
        except (binascii.Error, ValueError):
            continue  # the SDK's parser says what is wrong with it
        try:
            bounds.loads(raw, f"its {name}")
        except bounds.Malformed as e:
            raise ServiceAuthError("malformed", f"token is not a JWT: {e}") from None
