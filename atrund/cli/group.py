"""The `atrund` click group, what every command shares, and the one place errors are printed.

Every failure atrund expects is an AtrundError (atrund.errors): it ends the command with one
line on stderr, ``error: <what went wrong> (<the fix>)``, and the error's own exit code; no
traceback. Usage errors stay click's (exit code 2).
"""

from __future__ import annotations

import asyncio
import functools
import json
from pathlib import Path
from typing import Any

import click
from rich.console import Console
from rich.markup import escape

from atrund import __version__
from atrund import config as config_mod
from atrund.errors import AtrundError, ConfigError, describe

err = Console(stderr=True, highlight=False)

EXIT_NOT_SUCCESS = 3  # exec, invoke --wait, call: the status is not success
EXIT_NO_RESULT = 4  # invoke --wait: no result before the wait ran out


class Group(click.Group):
    """The top-level group: an AtrundError from any command becomes one line and its exit code."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except AtrundError as e:
            click.echo(f"error: {describe(e)}", err=True)
            ctx.exit(e.exit_code)


@click.group(cls=Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="atrund")
def main() -> None:
    """Social cloud hosting on the AT Protocol."""
    from atrund import log

    log.setup("warning")  # stdout carries JSON results; logs go to stderr (serve sets its own level)


def run_async(fn):
    """Run an async click command (its errors reach the group's handler as they are)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        return asyncio.run(fn(*args, **kwargs))

    return wrapper


def emit(obj: Any) -> None:
    click.echo(json.dumps(obj, indent=2, ensure_ascii=False))


def parse_uri(value: str, hint: str) -> tuple[str, str, str]:
    from atrund.atproto.uri import AtUri

    try:
        parsed = AtUri.parse(value)
    except ValueError as e:
        raise click.BadParameter(str(e), param_hint=hint) from None
    return parsed.authority, parsed.collection, parsed.rkey


def parse_args_json(value: str) -> dict[str, Any]:
    try:
        args = json.loads(value)
    except ValueError as e:
        raise click.BadParameter(f"not JSON: {e}", param_hint="--args") from None
    if not isinstance(args, dict):
        raise click.BadParameter("must be a JSON object, e.g. '{\"name\": \"ada\"}'", param_hint="--args")
    return args


def split(value: str | None) -> list[str]:
    """A comma-separated option as a list, blanks dropped."""
    return [x.strip() for x in (value or "").split(",") if x.strip()]


config_option = click.option("-c", "--config", "config_path", type=click.Path(path_type=Path, dir_okay=False),
                             required=True, help="The runner's TOML configuration.")


def warn(text: str) -> None:
    """One plain line on stderr: what works, but should be written differently."""
    err.print(f"[yellow]warning[/yellow]: {escape(text)}", soft_wrap=True)


def load_config(path: Path) -> config_mod.Config:
    try:
        cfg = config_mod.load(path)
    except ConfigError as e:
        raise ConfigError(f"{path}: invalid configuration: " + "; ".join(str(e).splitlines())) from None
    for line in cfg.warnings:  # loads, but should be written differently: one line each
        warn(f"{path}: {line}")
    return cfg


def executor_settings(config_path: Path | None, **defaults: Any) -> config_mod.ExecutorSection:
    """The executor section of a configuration, or the defaults when none is given."""
    return load_config(config_path).executor if config_path else config_mod.ExecutorSection(**defaults)
