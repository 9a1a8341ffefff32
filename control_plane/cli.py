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
credentials_app = typer.Typer(help="Encrypted credentials and their keys.", no_args_is_help=True)
app.add_typer(credentials_app, name="credentials")

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
def gateway(
    host: Annotated[str | None, typer.Option(help="Bind address (CP_GATEWAY__HOST).")] = None,
    port: Annotated[int | None, typer.Option(help="Port (CP_GATEWAY__PORT).")] = None,
    workers: Annotated[
        int, typer.Option(min=1, help="Processes sharing the port (limits stay shared).")
    ] = 1,
) -> None:
    """Run the OpenAI-compatible gateway (data plane)."""
    import uvicorn

    _setup_logging()
    settings = get_settings()
    uvicorn.run(
        "api.gateway.main:create_gateway",
        factory=True,
        host=host or settings.gateway.host,
        port=port or settings.gateway.port,
        workers=workers,
        log_config=None,
        access_log=False,
        lifespan="on",
        # uvloop and httptools: the gateway's own cost is per request.
        loop="auto",
        http="auto",
        server_header=False,
        date_header=False,
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
def bootstrap() -> None:
    """Create the first tenant and admin when no user exists; prints the one-time password."""
    from control_plane.core.db import create_engine, create_sessionmaker, session_scope
    from control_plane.identity.service import bootstrap_admin

    _setup_logging()
    settings = get_settings()
    if settings.auth.mode != "local":
        typer.echo("keycloak mode: users come from the identity provider; nothing to bootstrap")
        return

    async def run() -> tuple[str, str] | None:
        engine = create_engine(settings.database)
        try:
            async with session_scope(create_sessionmaker(engine)) as session:
                return await bootstrap_admin(session, settings)
        finally:
            await engine.dispose()

    created = asyncio.run(run())
    if created is None:
        typer.echo("users exist already; nothing to bootstrap")
        return
    username, password = created
    typer.echo(f"bootstrap admin: {username}  password: {password}  (shown once; change it)")


clusters_app = typer.Typer(help="Compute clusters.", no_args_is_help=True)
app.add_typer(clusters_app, name="clusters")


@clusters_app.command("onboard-local")
def clusters_onboard_local() -> None:
    """Onboard this machine as the bootstrap tenant's `local` cluster, unless the tenant
    has (or had) a cluster already. `cpctl dev` runs it on every start."""
    from control_plane.clusters.service import onboard_local_cluster
    from control_plane.core import temporal
    from control_plane.core.codec import payload_codec
    from control_plane.core.db import create_engine, create_sessionmaker
    from control_plane.credentials.crypto import load_vault

    _setup_logging()
    settings = get_settings()
    if settings.auth.mode != "local":
        typer.echo("keycloak mode: onboard clusters per tenant through the API")
        return

    async def run() -> str:
        engine = create_engine(settings.database)
        try:
            client = await temporal.connect(settings.temporal, codec=payload_codec(settings.codec))
            created = await onboard_local_cluster(
                create_sessionmaker(engine), settings, load_vault(settings), client
            )
        finally:
            await engine.dispose()
        if created is None:
            return "local cluster: the bootstrap tenant has clusters already; nothing to onboard"
        return f"local cluster: onboarding {created.name} ({created.id}) in {created.workflow_id}"

    typer.echo(asyncio.run(run()))


audit_app = typer.Typer(help="The audit log.", no_args_is_help=True)
app.add_typer(audit_app, name="audit")


@audit_app.command("verify")
def audit_verify() -> None:
    """Recompute the audit log's hash chain; exit 1 at the first row that was tampered with."""
    from control_plane.audit.service import verify_chain
    from control_plane.core.db import create_engine, create_sessionmaker, session_scope

    _setup_logging()
    settings = get_settings()

    async def run() -> tuple[int, int | None, str | None]:
        engine = create_engine(settings.database)
        try:
            async with session_scope(create_sessionmaker(engine)) as session:
                report = await verify_chain(session)
        finally:
            await engine.dispose()
        return report.checked, report.first_bad_seq, report.reason

    checked, bad, reason = asyncio.run(run())
    if bad is None:
        typer.echo(f"audit chain intact: {checked} events verified")
        return
    typer.echo(f"audit chain BROKEN at event {bad}: {reason} ({checked} verified before it)")
    raise typer.Exit(1)


models_app = typer.Typer(help="AI models.", no_args_is_help=True)
app.add_typer(models_app, name="models")


@models_app.command("scan")
def models_scan(
    path: Annotated[Path, typer.Argument(help="A model file or directory.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print the ScanReport as JSON.")] = False,
) -> None:
    """Scan model files for code that would run when loaded (nothing is loaded).

    Exit 0 when clean, 1 on findings (suspicious or malicious), 2 when the path cannot
    be read.
    """
    from control_plane.models.scanner import scan_path
    from control_plane.models.scanner.scan import severity_rank
    from workflows.contracts.models import Verdict

    try:
        report = scan_path(path)
    except OSError as err:
        typer.echo(f"error: {err}", err=True)
        raise typer.Exit(2) from None
    if as_json:
        typer.echo(report.model_dump_json(indent=2))
    else:
        typer.echo(
            f"{report.scanner} {report.version}: {report.verdict.value.upper()}"
            f" ({report.files_scanned} files, {report.bytes_scanned / 1024**2:.1f} MiB)"
        )
        ordered = sorted(report.findings, key=lambda f: -severity_rank(f.severity))
        for finding in ordered:
            typer.echo(
                f"  {finding.severity.value:<8} {finding.file}  {finding.code}: {finding.detail}"
            )
    raise typer.Exit(0 if report.verdict is Verdict.CLEAN else 1)


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


@credentials_app.command("generate-key")
def credentials_generate_key() -> None:
    """Print a new random key (base64 of 32 bytes) for CP_VAULT__MASTER_KEYS or
    CP_CODEC__KEYS."""
    from control_plane.core.codec import generate_key

    typer.echo(generate_key())


@credentials_app.command("rotate-master-key")
def credentials_rotate_master_key(
    batch_size: Annotated[
        int, typer.Option(min=1, max=10_000, help="Credentials re-wrapped per transaction.")
    ] = 200,
) -> None:
    """Re-wrap every credential's data key with the active master key.

    Steps: add the new key to CP_VAULT__MASTER_KEYS, make it CP_VAULT__ACTIVE_KEY
    everywhere, run this, and remove the old key only once it reports nothing remaining.
    Safe to rerun: credentials already under the active key are left alone.
    """
    from control_plane.core.db import create_engine, create_sessionmaker
    from control_plane.credentials.crypto import VaultError, load_vault
    from control_plane.credentials.service import RotationReport, rotate_master_key

    _setup_logging()
    settings = get_settings()
    try:
        vault = load_vault(settings)
    except VaultError as err:
        typer.echo(f"error: {err}", err=True)
        raise typer.Exit(2) from None

    async def run() -> RotationReport:
        engine = create_engine(settings.database)
        try:
            return await rotate_master_key(
                create_sessionmaker(engine),
                vault,
                batch_size=batch_size,
                on_batch=lambda n: typer.echo(f"re-wrapped {n} credential(s)"),
            )
        finally:
            await engine.dispose()

    try:
        report = asyncio.run(run())
    except VaultError as err:
        typer.echo(f"error: {err}", err=True)
        raise typer.Exit(1) from None
    typer.echo(
        f"active master key {report.active_key!r}: {report.rewrapped} re-wrapped, "
        f"{report.already_current} already current, {report.remaining} remaining "
        f"({report.live} live credentials)"
    )
    raise typer.Exit(0 if report.remaining == 0 else 1)


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
