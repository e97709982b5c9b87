"""The ``flask staleguard`` command group: thin click wrappers over plain functions."""

from __future__ import annotations

import json
import typing as t

import click
from flask import current_app
from flask.cli import AppGroup

from ..errors import UnknownBind
from .check import check
from .check import format_check
from .probe_idle import click_progress
from .probe_idle import format_probe
from .probe_idle import probe_idle
from .snapshot import pool_snapshot
from .tables import format_pool

cli = AppGroup(
    "staleguard", help="Inspect the connection pools and check their settings."
)

_F = t.TypeVar("_F", bound=t.Callable[..., t.Any])


def _common(f: _F) -> _F:
    f = click.option(
        "--json", "as_json", is_flag=True, help="Print JSON (schema: docs/cli.md)."
    )(f)
    return click.option(
        "--bind",
        metavar="KEY",
        help="Only this bind ('default' for the default one). Default: all binds.",
    )(f)


def _echo(document: t.Any) -> None:
    click.echo(json.dumps(document, indent=2))


def _unknown_bind(error: UnknownBind) -> click.BadParameter:
    return click.BadParameter(str(error), param_hint="'--bind'")


@cli.command("pool")
@_common
def pool_command(bind: str | None, as_json: bool) -> None:
    """Show each bind's pool, staleguard's settings and the server's view.

    Exits 2 if a database cannot be reached (after showing what is known).
    """
    try:
        snapshot = pool_snapshot(current_app, bind)
    except UnknownBind as e:
        raise _unknown_bind(e) from None
    binds = snapshot["binds"]
    if as_json:
        _echo(snapshot)
    else:
        click.echo(format_pool(binds))
    failed = [b for b in binds if b["error"]]
    for b in failed:
        click.echo(f"Error: bind {b['bind']}: {b['error']}", err=True)
    if failed:
        raise click.exceptions.Exit(2)


@cli.command("check")
@_common
@click.option(
    "--workers",
    type=click.IntRange(min=1),
    default=1,
    show_default=True,
    help="Processes that run the app (gunicorn --workers), each with its own pools.",
)
def check_command(bind: str | None, as_json: bool, workers: int) -> None:
    """Check the pool settings against each server's idle timeout.

    Exits 0 when nothing is wrong, 1 on problems, 2 if a database cannot be
    reached.
    """
    try:
        result = check(current_app, bind, workers=workers)
    except UnknownBind as e:
        raise _unknown_bind(e) from None
    if as_json:
        _echo(result.as_dict())
    elif result.problems or not result.unreachable:
        click.echo(format_check(result))
    for name, reason in result.unreachable:
        click.echo(f"Error: bind {name}: {reason}", err=True)
    raise click.exceptions.Exit(result.exit_code)


@cli.command("probe-idle")
@_common
@click.option(
    "--start",
    type=click.FloatRange(min=0, min_open=True),
    default=1.0,
    show_default=True,
    help="The first idle interval in seconds; each next one doubles.",
)
@click.option(
    "--max",
    "maximum",
    type=click.FloatRange(min=0, min_open=True),
    default=900.0,
    show_default=True,
    help="The longest idle interval to try, in seconds.",
)
@click.option(
    "--resolution",
    type=click.FloatRange(min=0, min_open=True),
    help="Stop when the bounds are this close, in seconds. Default: 5 % of the"
    " timer, at least 0.25.",
)
def probe_idle_command(
    bind: str | None,
    as_json: bool,
    start: float,
    maximum: float,
    resolution: float | None,
) -> None:
    """Measure the idle timer of the network path (load balancer, proxy, NAT).

    Exits 2 if a database cannot be reached.
    """
    if start > maximum:
        raise click.BadParameter(
            f"--start ({start:g}) is longer than --max ({maximum:g})",
            param_hint="'--start'",
        )
    try:
        result = probe_idle(
            current_app,
            bind,
            start=start,
            maximum=maximum,
            resolution=resolution,
            progress=click_progress,
        )
    except UnknownBind as e:
        raise _unknown_bind(e) from None
    if as_json:
        _echo(result.as_dict())
    elif result.timers:
        click.echo(format_probe(result.timers))
    for _, reason in result.unreachable:
        click.echo(f"Error: {reason}", err=True)
    raise click.exceptions.Exit(result.exit_code)
