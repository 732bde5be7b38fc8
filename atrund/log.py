"""Logging: structlog, one canonical line per invocation; JSON when not on a terminal."""

from __future__ import annotations

import logging
import sys

import structlog


def setup(level: str = "info", json_logs: bool | None = None) -> None:
    if json_logs is None:
        json_logs = not sys.stderr.isatty()
    # Tracebacks without local variables: a frame's locals can hold opened secrets (structlog's
    # rich formatter shows them by default).
    console = structlog.dev.ConsoleRenderer(colors=True, exception_formatter=structlog.dev.RichTracebackFormatter(show_locals=False))
    renderer = structlog.processors.JSONRenderer() if json_logs else console
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(getattr(logging, level.upper())),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=False,
    )
