"""The AT Protocol client: identity, repos, the runner's session, service auth and commit proofs.

This package is the network boundary: a remote answer of the wrong shape becomes a typed error here."""
