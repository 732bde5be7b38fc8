"""The `atrund` click group, what every command shares, and the one place errors are printed.

Every failure atrund expects is an AtrundError (atrund.errors): it ends the command with one
line on stderr, ``error: <what went wrong> (<the fix>)``, and the error's own exit code; no
traceback. Usage errors stay click's (exit code 2).
"""

from __future__ import annotations

import asyncio
import functools
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click
from rich.console import Console
from rich.markup import escape

from atrund import __version__
from atrund import config as config_mod
from atrund.errors import AtrundError, ConfigError, describe

# soft_wrap: a line is never broken at the terminal's width (an AT URI must stay one string to copy)
err = Console(stderr=True, highlight=False, soft_wrap=True)

EXIT_NOT_SUCCESS = 3  # exec, invoke --wait, call: the status is not success
EXIT_NO_RESULT = 4  # invoke --wait: no result before the wait ran out


class Output:
    """How results are printed: JSON for scripts (``--json``, or stdout not a terminal), else for
    people. One switch for every command, so ``--json`` means the same everywhere."""

    json = False

    @classmethod
    def as_json(cls) -> bool:
        return cls.json or not sys.stdout.isatty()


def _set_json(ctx: click.Context, param: click.Parameter, value: bool) -> None:
    if value:
        Output.json = True


def json_flag() -> click.Option:
    return click.Option(["--json"], is_flag=True, expose_value=False, is_eager=True, callback=_set_json,
                        help="Print results as JSON (the default when stdout is not a terminal).")


class Command(click.Command):
    """Every atrund command: takes ``--json`` (see Output)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.params.append(json_flag())


class Group(click.Group):
    """Every atrund group: its commands are Commands, its subgroups Groups; an AtrundError from
    any command becomes one line and its exit code, and so does a usage error (exit 2)."""

    command_class = Command
    group_class = type  # subgroups are of this class too

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except AtrundError as e:
            click.echo(f"error: {describe(e)}", err=True)
            ctx.exit(e.exit_code)
        except click.UsageError as e:  # exit 2 as ever, but one line: click's own show() adds the usage text
            line = f"error: {e.format_message()} (see `{(e.ctx or ctx).command_path} --help`)"
            e.show = lambda file=None: click.echo(line, err=True)
            raise


@click.group(cls=Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="atrund")
@click.option("--json", is_flag=True, expose_value=False, is_eager=True, callback=_set_json,
              help="Print results as JSON (the default when stdout is not a terminal).")
def main() -> None:
    """Social cloud hosting on the AT Protocol.

    Results go to stdout (JSON with --json or when piped; for people on a terminal); progress
    and errors go to stderr, an error as one line. `atrund completion bash|zsh|fish` prints
    shell completion.
    """
    from atrund import log

    log.setup("warning")  # stdout carries JSON results; logs go to stderr (serve sets its own level)


def run_async(fn):
    """Run an async click command (its errors reach the group's handler as they are)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        return asyncio.run(fn(*args, **kwargs))

    return wrapper


def emit(obj: Any, human: Callable[[Any], None] | None = None) -> None:
    """Print a command's result: JSON (see Output), else ``human(obj)``, else the same data as
    plain ``key: value`` lines (nested values as one line of JSON, URIs whole)."""
    if Output.as_json():
        print_json(obj)
    elif human is not None:
        human(obj)
    else:
        show(obj)


def emit_line(obj: Any, human: Callable[[Any], None]) -> None:
    """One item of a stream (``watch``, ``tail``): a JSON line (see Output), else ``human(obj)``."""
    if Output.as_json():
        click.echo(json.dumps(obj, ensure_ascii=False))
    else:
        human(obj)


def print_json(obj: Any) -> None:
    """JSON on stdout, always: for what is JSON by nature (a schema, sealed objects for a record)."""
    click.echo(json.dumps(obj, indent=2, ensure_ascii=False))


def show(obj: Any, indent: str = "") -> None:
    """``obj`` for people: a dict as aligned ``key: value`` lines, a list item by item."""
    if isinstance(obj, list):
        for i, item in enumerate(obj):
            if i:
                click.echo()
            show(item, indent)
        return
    if not isinstance(obj, dict):
        click.echo(indent + (obj if isinstance(obj, str) else json.dumps(obj, ensure_ascii=False)))
        return
    width = max((len(str(k)) for k in obj), default=0)
    for key, value in obj.items():
        text = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)
        click.echo(f"{indent}{str(key) + ':':<{width + 1}} {text}")


def fail_line(text: str) -> None:
    """A bundle's own error (a status that is not success), as one line on stderr."""
    err.print(f"[red]error[/red]: {escape(' '.join(str(text).split()))}")


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
