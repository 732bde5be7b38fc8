"""The runner's own exceptions.

    AtrundError
    ├── ConfigError (atrund.config)      the configuration is unusable; names the TOML key
    ├── IdentityError                    a DID does not resolve, or names no PDS
    ├── RemoteError                      a PDS answered with an error or not at all
    │   ├── NotFound                     the record or blob does not exist
    │   ├── ContentMismatch              bytes that do not hash to the CID they were fetched by
    │   ├── TooLarge                     more bytes than the configured limit
    │   └── Unreachable                  network failure or 5xx: worth retrying
    ├── NotServed                        the access policy does not serve this DID (checked before resolving it)
    └── BundleRefused                    the bundle cannot be run as pinned (CID mismatch, too large)
        ├── VersionGone                  the pinned CID is no longer in the repo, nor cached here
        ├── EndpointUndeclared           the endpoint is not one the bundle record declares
        └── PermissionsRefused           the bundle asks for permissions this runner does not grant

ExecutorError (atrund.execute) is the executor's; ServiceAuthError (atrund.atproto.serviceauth) is a
refused XRPC token. atrund.gateway maps all of these to HTTP statuses, in one function. Third-party exceptions (aiohttp, the atproto
SDK) are translated into these where they are raised: atrund.atproto.repos for reads, atrund.atproto.session
for the runner's own writes, atrund.atproto.identity for DID resolution.
"""


class AtrundError(Exception):
    pass


class IdentityError(AtrundError):
    pass


class RemoteError(AtrundError):
    pass


class NotFound(RemoteError):
    pass


class Unreachable(RemoteError):
    pass


class ContentMismatch(RemoteError):
    pass


class TooLarge(RemoteError):
    pass


class NotServed(AtrundError):
    """The access policy does not serve ``did``: raised before the runner resolves it, so a caller
    cannot make the runner connect to a host of their choosing (a did:web) by naming it."""

    def __init__(self, did: str, message: str | None = None) -> None:
        super().__init__(message or f"{did} is not served by this runner")
        self.did = did


class BundleRefused(AtrundError):
    pass


class VersionGone(BundleRefused):
    pass


class EndpointUndeclared(BundleRefused):
    pass


class PermissionsRefused(BundleRefused):
    pass
