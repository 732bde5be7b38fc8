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
    # JSON lines carry the traceback as text in "exception" (without local variables, as above);
    # the console renderer formats exc_info itself.
    tracebacks = [structlog.processors.format_exc_info] if json_logs else []
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            *tracebacks,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(getattr(logging, level.upper())),
        # sys.stderr as it is when a line is written, not when logging was set up: whoever swaps
        # stderr later (a test's capture, a daemon's redirect) never leaves us a closed file.
        logger_factory=lambda *args: structlog.PrintLogger(sys.stderr),
        cache_logger_on_first_use=False,
    )


def asyncio_errors(loop, context: dict) -> None:
    """asyncio's own reports (a task's exception never retrieved, a callback that raised) as a log
    line with its traceback, instead of text printed on stderr."""
    structlog.get_logger("atrund.asyncio").error("unhandled error in a background task", message=context.get("message"),
                                                 task=repr(context.get("task") or context.get("future") or "")[:200],
                                                 exc_info=context.get("exception"))
