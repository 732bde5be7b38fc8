"""Sealed secrets: name/value pairs an author encrypts to a runner's public key.

Records are public, so a secret travels sealed: HPKE (RFC 9180, base mode) with
DHKEM(X25519, HKDF-SHA256), HKDF-SHA256 and ChaCha20-Poly1305, single shot. The HPKE ``info``
binds the ciphertext to where it may be used::

    info = b"dev.atrun.secret/1\\n" + JSON ["<author DID>", "<runner DID>", "<bundle AT URI>", "<name>"]

(compact JSON, UTF-8). A blob copied into another author's invocation, aimed at another bundle
or runner, or renamed, does not open: the AEAD tag fails. The ciphertext is HPKE's ``enc``
(32 bytes) followed by the AEAD output, base64 (standard alphabet, padded) in the record.

Secret values never go into an exception message: every error here names the secret and where
it sat, never what it holds. (Called ``sealed`` rather than ``secrets`` so that running a file
of this package directly can never shadow the standard library's ``secrets`` module.)
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import os
import re
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import x25519
from cryptography.hazmat.primitives.hpke import AEAD, KDF, KEM, Suite

from atrund.errors import KeyFileError, SecretError

ALG = "hpke-x25519-sha256-chacha20poly1305"
SUITE = Suite(KEM.X25519, KDF.HKDF_SHA256, AEAD.CHACHA20_POLY1305)
INFO_PREFIX = b"dev.atrun.secret/1\n"
NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,127}$")
MAX_VALUE_BYTES = 8192
MAX_SECRETS = 32  # per record (the lexicons say the same)
ENC_BYTES = 32  # X25519 encapsulated key
TAG_BYTES = 16


def key_id(public: x25519.X25519PublicKey) -> str:
    """A short, stable name for a public key: 16 base32 characters of its SHA-256."""
    raw = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return base64.b32encode(hashlib.sha256(raw).digest()).decode().lower()[:16]


def binding(author: str, runner: str, bundle_uri: str, name: str) -> bytes:
    """The HPKE info: what a sealed secret is bound to (documented in docs/protocol.md)."""
    return INFO_PREFIX + json.dumps([author, runner, bundle_uri, name], separators=(",", ":"), ensure_ascii=False).encode()


def check_name(name: str) -> None:
    if not isinstance(name, str) or not NAME.match(name):
        raise SecretError(f"secret name {name!r} is not an environment variable name (letters, digits, _; not starting with a digit)")


@dataclass(frozen=True)
class RunnerKey:
    """A runner's published secrets key, as its dev.atrun.runner record states it."""

    id: str
    public: x25519.X25519PublicKey

    @classmethod
    def from_record(cls, runner_record: dict[str, Any], runner_did: str) -> "RunnerKey":
        key = runner_record.get("secretsKey")
        if not isinstance(key, dict):
            raise SecretError(f"runner {runner_did} publishes no secrets key (its dev.atrun.runner record has no secretsKey): "
                              "it cannot receive sealed secrets")
        if key.get("alg") != ALG:
            raise SecretError(f"runner {runner_did}'s secrets key uses {key.get('alg')!r}; this atrund seals with {ALG!r}")
        try:
            public = x25519.X25519PublicKey.from_public_bytes(base64.b64decode(key.get("publicKey", ""), validate=True))
        except (ValueError, binascii.Error, TypeError) as e:
            raise SecretError(f"runner {runner_did}'s secretsKey.publicKey is not a base64 X25519 public key: {e}") from None
        if key_id(public) != key.get("id"):
            raise SecretError(f"runner {runner_did}'s secretsKey.id {key.get('id')!r} does not name its public key")
        return cls(key["id"], public)

    def to_record(self) -> dict[str, str]:
        raw = self.public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        return {"id": self.id, "alg": ALG, "publicKey": base64.b64encode(raw).decode()}


def seal(name: str, value: str, key: RunnerKey, *, author: str, runner: str, bundle_uri: str) -> dict[str, str]:
    """One sealed secret, in the form records carry it (dev.atrun.defs#sealedSecret)."""
    check_name(name)
    data = value.encode("utf-8")
    if len(data) > MAX_VALUE_BYTES:
        raise SecretError(f"secret {name}: value is {len(data)} bytes, more than the limit of {MAX_VALUE_BYTES}")
    sealed = SUITE.encrypt(data, key.public, info=binding(author, runner, bundle_uri, name))
    return {"name": name, "keyId": key.id, "ciphertext": base64.b64encode(sealed).decode()}


# -- the runner's side -------------------------------------------------------------------------

def generate_key_file(path: Path, force: bool = False) -> str:
    """Write a new private key (PKCS#8 PEM, mode 0600) and return its key id.

    Refuses to replace an existing file unless ``force``: a replaced key cannot open anything
    sealed to the old one (keep the old file and list it in secrets.old_key_files instead).
    """
    if path.exists() and not force:
        raise KeyFileError(f"{path} already exists; to rotate, move it aside (list the old file in "
                           "secrets.old_key_files so existing sealed secrets keep opening) or pass --force")
    private = x25519.X25519PrivateKey.generate()
    pem = private.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.new")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)  # never readable by others, not even briefly
    with os.fdopen(fd, "wb") as f:
        f.write(pem)
    os.replace(tmp, path)
    return key_id(private.public_key())


def load_key_file(path: Path) -> x25519.X25519PrivateKey:
    try:
        st = path.stat()
        if st.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
            raise KeyFileError(f"{path} is accessible by other users (mode {stat.S_IMODE(st.st_mode):04o}); chmod 600 it")
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except OSError as e:
        raise KeyFileError(f"{path}: cannot read: {e.strerror} (create it with: atrund keys init -c CONFIG)") from e
    except ValueError as e:
        raise KeyFileError(f"{path}: not a PEM private key: {e}") from None
    if not isinstance(key, x25519.X25519PrivateKey):
        raise KeyFileError(f"{path}: holds a {type(key).__name__}, not an X25519 key")
    return key


class Keyring:
    """The runner's private keys: the current one (published) and old ones (still opening)."""

    def __init__(self, current: x25519.X25519PrivateKey, old: tuple[x25519.X25519PrivateKey, ...] | list = ()) -> None:
        self.current = RunnerKey(key_id(current.public_key()), current.public_key())
        self._keys = {key_id(k.public_key()): k for k in old}
        self._keys[self.current.id] = current

    @classmethod
    def load(cls, key_file: Path, old_key_files: list[Path]) -> "Keyring":
        return cls(load_key_file(key_file), [load_key_file(p) for p in old_key_files])

    def open(self, sealed: list[Any], *, author: str, runner: str, bundle_uri: str, where: str) -> dict[str, str]:
        """Open every sealed secret of one record (``where`` says which, for messages)."""
        out: dict[str, str] = {}
        for i, item in enumerate(sealed):
            name = item.get("name") if isinstance(item, dict) else None
            label = f"secret {name!r} in the {where}" if isinstance(name, str) else f"secrets[{i}] in the {where}"
            if not isinstance(item, dict) or not isinstance(name, str):
                raise SecretError(f"{label}: not a sealed secret object with a name")
            try:
                check_name(name)
            except SecretError as e:
                raise SecretError(f"{label}: {e}") from None
            if name in out:
                raise SecretError(f"{label}: the name appears twice")
            private = self._keys.get(item.get("keyId"))
            if private is None:
                raise SecretError(f"{label} is sealed to key {item.get('keyId')!r}, which this runner does not hold "
                                  f"(its current key is {self.current.id}): seal it again to the key in the runner's record")
            try:
                blob = base64.b64decode(item.get("ciphertext") or "", validate=True)
            except (binascii.Error, TypeError, ValueError):
                raise SecretError(f"{label}: ciphertext is not base64") from None
            if len(blob) < ENC_BYTES + TAG_BYTES:
                raise SecretError(f"{label}: ciphertext is too short to be sealed")
            try:
                plain = SUITE.decrypt(blob, private, info=binding(author, runner, bundle_uri, name))
            except (InvalidTag, ValueError):
                raise SecretError(f"{label} does not open: it was sealed for another author, runner, bundle or name, "
                                  "or altered since") from None
            try:
                out[name] = plain.decode("utf-8")
            except UnicodeDecodeError:
                raise SecretError(f"{label}: the value is not UTF-8 text") from None
        return out


def redact(value: Any, secrets: dict[str, str], min_length: int = 4) -> Any:
    """``value`` with every secret value replaced by ``[secret NAME]``, in strings and keys.

    A seatbelt against a runner or bundle echoing a secret by accident (an exception message,
    an echoed header), not a boundary: a bundle sees its secrets and can always send them on in
    another form. Values shorter than ``min_length`` are left alone (redacting "1" everywhere
    would wreck results while protecting nothing).
    """
    pairs = sorted(((v, f"[secret {n}]") for n, v in secrets.items() if len(v) >= min_length), key=lambda p: -len(p[0]))
    if not pairs:
        return value

    def walk(v: Any) -> Any:
        if isinstance(v, str):
            for secret, mark in pairs:
                if secret in v:
                    v = v.replace(secret, mark)
            return v
        if isinstance(v, dict):
            return {walk(k): walk(x) for k, x in v.items()}
        if isinstance(v, list):
            return [walk(x) for x in v]
        return v

    return walk(value)


def redact_response(response, secrets: dict[str, str]):
    """An ExecResponse with ``redact`` applied to what leaves the run: data, error, response
    (a result, an HTTP answer) and output (atrund logs, the runner's log)."""
    if not secrets:
        return response
    http = response.response
    return response.model_copy(update={
        "data": redact(response.data, secrets),
        "error": redact(response.error, secrets),
        "output": redact(response.output, secrets),
        "response": http and type(http).model_validate(redact(http.model_dump(), secrets)),
    })
