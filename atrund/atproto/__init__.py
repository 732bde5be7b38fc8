"""The AT Protocol client: identity (DID documents, handles, signing keys), repos (capped,
verified reads from any PDS), session (the one account that writes), service auth, commit/MST
proof, and uri (AT URIs and TIDs: the one parser and maker).

This package is the network boundary: a remote answer of the wrong shape (not JSON, a key
missing, a value of the wrong type) becomes a typed AtrundError here (RemoteError from a PDS,
IdentityError from a DID directory or document, ProofError from a relay's commit), never a
KeyError or TypeError in the caller. Its caches (lru.LRU) are bounded."""
