"""The one list of executor backends: every place that names a backend (config validation, the
CLI's choices, ``doctor``, ``auto``, the tests) takes the names from here.

A leaf module (it imports nothing of atrund but atrund.errors), so the configuration can validate
names against it.
"""

from __future__ import annotations

import importlib

from atrund.errors import UnknownBackend

# Canonical name -> "module:class", strongest isolation first: the order ``auto`` tries them in
# (probe.order; with gVisor configured, container comes before process).
IMPLEMENTATIONS = {
    "microvm": "atrund.execute.microvm.backend:MicroVmBackend",
    "process": "atrund.execute.process.backend:ProcessBackend",
    "container": "atrund.execute.container.backend:ContainerBackend",
    "none": "atrund.execute.direct:DirectBackend",
}
BACKENDS = tuple(IMPLEMENTATIONS)
AUTO = "auto"  # not a backend: probe and take the strongest that works
# Old names still accepted wherever an isolation is parsed (config, flags), and said to be old.
ALIASES = {"firecracker": "microvm"}
# Every name an isolation may be given as: what a CLI choice or a config value accepts.
NAMES = (AUTO, *BACKENDS, *ALIASES)


def accepted() -> str:
    """The accepted names, for messages."""
    aliases = "; ".join(f"{old} is the old name of {new}" for old, new in ALIASES.items())
    return f"{', '.join(BACKENDS)}, {AUTO}" + (f"; {aliases}" if aliases else "")


def canonical(name: str) -> str:
    """The backend (or ``auto``) a name means; an alias is accepted (the configuration says so
    among its warnings)."""
    if name in ALIASES:
        return ALIASES[name]
    if name == AUTO or name in BACKENDS:
        return name
    raise UnknownBackend(f"unknown isolation {name!r} (available: {accepted()})")


def backend_class(name: str) -> type:
    """The Backend class of a canonical backend name (imported only when asked for)."""
    module, _, cls = IMPLEMENTATIONS[name].partition(":")
    return getattr(importlib.import_module(module), cls)
