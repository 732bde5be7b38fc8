"""The `container` backend: a Docker container per worker, and the runtime image it runs."""
