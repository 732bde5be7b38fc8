"""Per-worker cgroups when several runners share a host."""

import os

import pytest

from atrund.execute.process import Cgroups


def test_cleanup_spares_a_fresh_empty_cgroup_of_another_runner():
    """A runner starting up removes cgroups that dead runners left behind, but not one another
    runner has just created for a worker that has not joined it yet (it is empty for a moment):
    removing it made that worker fail to start with FileNotFoundError on cgroup.procs."""
    cgroups = Cgroups()
    if not cgroups.available:
        pytest.skip("cgroup v1 memory and pids controllers are not writable here")
    name = f"test-fresh-{os.getpid()}"
    procs = cgroups.create(name, 64 * 1024 * 1024, 16)
    try:
        Cgroups().remove_empty()  # what another runner does when it starts
        assert all(os.path.exists(p) for p in procs)
        Cgroups().remove_empty(min_age=-1)  # once old enough, an empty one goes
        assert not any(os.path.exists(os.path.dirname(p)) for p in procs)
    finally:
        for parent in cgroups.parents.values():
            if (parent / name).exists():
                (parent / name).rmdir()
