"""`cpctl`: the one command-line entry point (API, workers, migrations, dev stack)."""

from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path
from typing import Annotated

import typer
from alembic.config import Config

from control_plane.core.config import get_settings
from control_plane.core.logging import configure_logging

app = typer.Typer(
    help="control-plane: serve AI models with durable workflows.", no_args_is_help=True
)
db_app = typer.Typer(help="Database migrations.", no_args_is_help=True)
app.add_typer(db_app, name="db")

ALEMBIC_INI = Path(__file__).resolve().parent.parent / "alembic.ini"


def _setup_logging() -> None:
    settings = get_settings()
    configure_logging(level=settings.log_level, json=settings.json_logs)


@app.command()
def api(
    host: Annotated[str | None, typer.Option(help="Bind address (CP_API__HOST).")] = None,
    port: Annotated[int | None, typer.Option(help="Port (CP_API__PORT).")] = None,
) -> None:
    """Run the REST API."""
    import uvicorn

    _setup_logging()
    settings = get_settings()
    uvicorn.run(
        "api.app:create_app",
        factory=True,
        host=host or settings.api.host,
        port=port or settings.api.port,
        log_config=None,
        access_log=False,
        lifespan="on",
    )


@app.command()
def worker(
    queue: Annotated[
        list[str] | None, typer.Option("--queue", "-q", help="Task queue to poll (repeatable).")
    ] = None,
    all_queues: Annotated[bool, typer.Option("--all", help="Poll every pool's queue.")] = False,
) -> None:
    """Run a worker for one or more pools."""
    from workers.main import run_workers
    from workflows.queues import ALL_QUEUES, parse_queue

    _setup_logging()
    if all_queues:
        queues = list(ALL_QUEUES)
    elif queue:
        try:
            queues = [parse_queue(q) for q in queue]
        except ValueError as err:
            raise typer.BadParameter(str(err), param_hint="--queue") from err
    else:
        raise typer.BadParameter("give --queue NAME (repeatable) or --all")
    asyncio.run(run_workers(get_settings(), queues))
    # The workers drained cleanly. Skip interpreter finalisation: the Temporal SDK's
    # native threads can abort it at exit (a known SDK issue), turning a clean stop
    # into a crash report.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


@app.command()
def dev() -> None:
    """Start the whole system on embedded defaults (Temporal, PostgreSQL, Redis, API, workers)."""
    from control_plane.devstack.supervisor import run_dev

    _setup_logging()
    raise typer.Exit(run_dev(get_settings()))


@app.command()
def diagnose(
    timeout: Annotated[int, typer.Option(help="Seconds to wait for each pool.")] = 15,
) -> None:
    """Check that a worker of every pool answers (runs the DiagnoseSystem workflow)."""
    from control_plane.system.service import run_diagnosis

    _setup_logging()
    result = asyncio.run(run_diagnosis(get_settings(), timeout))
    for ping in result.answered:
        typer.echo(f"ok      {ping.queue.value:<18} {ping.worker_host} pid {ping.worker_pid}")
    for failure in result.failed:
        typer.echo(f"FAILED  {failure.queue.value:<18} {failure.reason}")
    raise typer.Exit(0 if result.healthy else 1)


def alembic_config(database_url: str | None = None) -> Config:
    config = Config(str(ALEMBIC_INI))
    config.set_main_option("script_location", str(Path(__file__).parent / "migrations"))
    if database_url:
        config.attributes["database_url"] = database_url
    return config


@db_app.command("upgrade")
def db_upgrade(revision: Annotated[str, typer.Argument()] = "head") -> None:
    """Apply migrations up to REVISION (default: head)."""
    from alembic import command

    _setup_logging()
    command.upgrade(alembic_config(), revision)


@db_app.command("downgrade")
def db_downgrade(revision: Annotated[str, typer.Argument()]) -> None:
    """Revert migrations down to REVISION (e.g. -1 or base)."""
    from alembic import command

    _setup_logging()
    command.downgrade(alembic_config(), revision)


@db_app.command("current")
def db_current() -> None:
    """Show the applied revision."""
    from alembic import command

    _setup_logging()
    command.current(alembic_config(), verbose=True)


if __name__ == "__main__":
    app()
