"""The `process` backend: a fenced process per worker (namespaces, Landlock, seccomp, cgroups)."""
