"""The ``charter`` command: a thin layer that parses arguments and calls the library."""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from collections.abc import Callable
from contextlib import nullcontext
from datetime import UTC, datetime
from typing import Annotated, Any, TypeVar

import typer
from rich.console import Console
from rich.table import Table

from .credits import Credits
from .errors import CharterError, ConfigurationError
from .gate import Charter
from .migrate import upgrade
from .settings import Settings

app = typer.Typer(
    help="Charter: one gate for every state-changing business action.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
db_app = typer.Typer(help="Database schema.", no_args_is_help=True)
audit_app = typer.Typer(help="The tamper-evident audit trail.", no_args_is_help=True)
app.add_typer(db_app, name="db")
app.add_typer(audit_app, name="audit")
policy_app = typer.Typer(help="Review the rules.", no_args_is_help=True)
app.add_typer(policy_app, name="policy")
idem_app = typer.Typer(help="Idempotency records.", no_args_is_help=True)
app.add_typer(idem_app, name="idempotency")
credits_app = typer.Typer(help="Credits, holds and the ledger.", no_args_is_help=True)
workflow_app = typer.Typer(help="Declared workflows.", no_args_is_help=True)
app.add_typer(workflow_app, name="workflow")
app.add_typer(credits_app, name="credits")

T = TypeVar("T")

# Named, not imported: the CLI imports the reference service only when a command asks for it.
DEMO_APP = "charter.demo.service:reference_charter"

console = Console()
err = Console(stderr=True)

DatabaseOption = Annotated[
    str | None,
    typer.Option(
        "--database-url",
        envvar="CHARTER_DATABASE_URL",
        help="SQLAlchemy URL (default: the demo's SQLite file).",
    ),
]


def _settings(
    database_url: str | None, load: Callable[[], Settings] = Settings.from_env
) -> Settings:
    """The settings from the environment, with the command line's overrides on top.

    Overrides replace their own fields only (``dataclasses.replace``): rebuilding
    the settings by hand once dropped the webhook secrets and the payment provider.
    ``load``: the audit commands read :meth:`Settings.for_audit` (no token secret).
    """
    try:
        settings = load()
    except CharterError as exc:
        err.print(f"[red]error:[/red] {exc.message}")
        raise typer.Exit(2) from exc
    if database_url:
        settings = dataclasses.replace(settings, database_url=database_url)
    return settings


def _charter(settings: Settings) -> Charter:
    try:
        return Charter(
            database_url=settings.database_url,
            audit_keys=settings.audit_keys,
            development=settings.development,
            audit_anchor=settings.audit_anchor_uri,
            rate_limits=settings.rate_limits,  # the service the CLI serves (demo) is limited
        )
    except CharterError as exc:
        err.print(f"[red]error:[/red] {exc.message}")
        raise typer.Exit(2) from exc


def _call(
    database_url: str | None,
    operation: Callable[[Charter], T],
    load: Callable[[], Settings] = Settings.from_env,
) -> T:
    """Run one library call on the configured Charter; a Charter error exits 1 with its message."""
    charter = _charter(_settings(database_url, load))
    try:
        return operation(charter)
    except CharterError as exc:
        raise _fail(exc) from exc
    finally:
        charter.close()


def _fail(exc: CharterError) -> typer.Exit:
    err.print(f"[red]error[/red] ({exc.code}): {exc.message}")
    return typer.Exit(1)


@db_app.command("upgrade")
def db_upgrade(
    database_url: DatabaseOption = None,
    migrations: Annotated[
        list[str] | None,
        typer.Option(
            "--migrations",
            "--location",
            help="Your application's Alembic version directory (package:path); repeatable.",
        ),
    ] = None,
    demo: Annotated[
        bool, typer.Option("--demo", help="Also migrate the reference service's tables.")
    ] = False,
) -> None:
    """Bring Charter's tables, and your application's (--migrations), to the latest revision."""
    locations = list(migrations or [])
    if demo:
        from .demo.app import DEMO_MIGRATIONS

        locations.extend(DEMO_MIGRATIONS)
    charter = _charter(_settings(database_url))
    try:
        upgrade(charter.engine, extra_locations=locations)
    except CharterError as exc:
        raise _fail(exc) from exc
    finally:
        charter.engine.dispose()
    console.print(f"database upgraded: {charter.engine.url.render_as_string()}")


@audit_app.command("verify")
def audit_verify(
    database_url: DatabaseOption = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the report as JSON.")] = False,
) -> None:
    """Check every audit entry and checkpoint against the anchor; exit 1 and say where anything
    was tampered with. Needs only the database, the audit keys and the anchor
    (CHARTER_DATABASE_URL, CHARTER_AUDIT_KEY, CHARTER_AUDIT_ANCHOR)."""
    report = _call(database_url, lambda charter: charter.verify_audit(), Settings.for_audit)
    if as_json:
        console.print_json(
            json.dumps(
                {
                    "ok": report.ok,
                    "entries": report.entries,
                    "streams": report.streams,
                    "checkpoints": report.checkpoints,
                    "anchor": report.anchor,
                    "anchor_records": report.anchor_records,
                    "notes": report.notes,
                    "problems": [
                        {
                            "kind": p.kind,
                            "stream": p.stream,
                            "seq": p.seq,
                            "entry_id": p.entry_id,
                            "detail": p.detail,
                        }
                        for p in report.problems
                    ],
                }
            )
        )
    else:
        for problem in report.problems:
            console.print(f"[red]✗[/red] {problem}", markup=False, highlight=False)
        for note in report.notes:
            console.print(f"[bold yellow]warning:[/bold yellow] {note}", highlight=False)
        status = "[green]verified[/green]" if report.ok else "[red]TAMPERED[/red]"
        anchor = (
            f"anchor {report.anchor} ({report.anchor_records} records)"
            if report.anchored
            else "no anchor"
        )
        console.print(
            f"{status}: {report.entries} entries in {report.streams} streams, "
            f"{report.checkpoints} checkpoints, {anchor}, {len(report.problems)} problems",
            highlight=False,
        )
    if not report.ok:
        raise typer.Exit(1)


@audit_app.command("checkpoint")
def audit_checkpoint(database_url: DatabaseOption = None) -> None:
    """Sign the head of every audit stream, and copy it to the anchor (guards the tails)."""
    row = _call(database_url, lambda charter: charter.checkpoint_audit(), Settings.for_audit)
    where = " (and anchored)" if row["anchor"] else " (no anchor configured)"
    console.print(
        f"checkpoint {row['position']} signed over {len(row['heads'])} streams{where}",
        highlight=False,
    )


@audit_app.command("prune")
def audit_prune(
    before: Annotated[
        str, typer.Option(help="Delete entries older than this ISO 8601 time (UTC if no zone).")
    ],
    database_url: DatabaseOption = None,
    yes: Annotated[bool, typer.Option("--yes", help="Do not ask for confirmation.")] = False,
) -> None:
    """Delete old audit entries for retention, with a signed record of how far (per stream).

    Refuses if the trail does not verify first. `charter audit verify` then
    expects each pruned stream to start after the recorded seq.
    """
    try:
        cutoff = datetime.fromisoformat(before)
    except ValueError as exc:
        err.print(f"[red]error:[/red] --before {before!r} is not an ISO 8601 time")
        raise typer.Exit(2) from exc
    if cutoff.tzinfo is None:
        cutoff = cutoff.replace(tzinfo=UTC)
    if not yes:
        typer.confirm(f"Delete every audit entry older than {cutoff.isoformat()}?", abort=True)
    pruned = _call(database_url, lambda charter: charter.prune_audit(cutoff), Settings.for_audit)
    if pruned.record is None:
        console.print(f"nothing older than {cutoff.isoformat()}", highlight=False)
        return
    marks = pruned.record["heads"]
    console.print(
        f"pruned {pruned.entries} entries in {len(marks)} streams; signed prune record "
        f"(checkpoint {pruned.record['position']})",
        highlight=False,
    )


@audit_app.command("show")
def audit_show(
    resource_type: str,
    resource_id: str,
    database_url: DatabaseOption = None,
) -> None:
    """Print a record's audit history, oldest first."""

    def read(charter: Charter) -> list[dict[str, Any]]:
        return charter.history(resource_type, resource_id)

    history = _call(database_url, read, Settings.for_audit)
    table = Table(title=f"{resource_type} {resource_id}")
    for column in (
        "at",
        "action",
        "subject",
        "real actor",
        "channel",
        "decision",
        "outcome",
        "state",
        "reason",
    ):
        table.add_column(column)
    for e in history:
        state = f"{e['state_before'] or ''} → {e['state_after'] or ''}" if e["state_after"] else ""
        table.add_row(
            str(e["at"])[:19],
            e["action"],
            e["subject"],
            e["real_actor"] or "",
            e["channel"],
            e["decision"],
            e["outcome"],
            state,
            e["reason"] or "",
        )
    Console(width=max(console.width, 180)).print(table)
    if not history:
        console.print("no entries")


AppOption = Annotated[
    str | None,
    typer.Option(
        "--app",
        help="module:attribute of your Charter (or of a function returning one), "
        "found from the working directory.",
    ),
]
DemoOption = Annotated[
    bool, typer.Option("--demo", help="Use the reference service's Charter instead of --app.")
]


def _app_spec(app_spec: str | None, demo: bool) -> str:
    """Which Charter a command reads: ``--app``, or the reference service only if asked."""
    if demo:
        return DEMO_APP
    if not app_spec:
        err.print(
            "[red]error:[/red] say which Charter to use: --app module:attribute "
            "(or --demo for the reference service)"
        )
        raise typer.Exit(2)
    return app_spec


def _import(spec: str, default: str) -> Any:
    """Import ``module:attribute`` (``default`` if no attribute), found from the working
    directory as uvicorn does (``service:charter`` needs no ``PYTHONPATH=.``)."""
    import importlib

    module_name, _, attribute = spec.partition(":")
    cwd = os.getcwd()
    if cwd not in sys.path and "" not in sys.path:
        sys.path.insert(0, cwd)
    try:
        return getattr(importlib.import_module(module_name), attribute or default)
    except (ImportError, AttributeError, SyntaxError, CharterError) as exc:
        err.print(f"[red]error:[/red] cannot load {spec!r}: {exc}")
        raise typer.Exit(2) from exc


def _load_app(spec: str) -> Charter:
    """Import ``module:attribute`` (a Charter, or a callable that returns one).

    Every ``--app`` command loads through here. The module is found from the
    working directory, as uvicorn does (``--app service:charter`` needs no
    ``PYTHONPATH=.``).
    """
    target = _import(spec, "charter")
    try:
        charter = target() if callable(target) and not isinstance(target, Charter) else target
    except CharterError as exc:
        err.print(f"[red]error:[/red] cannot load {spec!r}: {exc}")
        raise typer.Exit(2) from exc
    if not isinstance(charter, Charter):
        err.print(f"[red]error:[/red] {spec!r} is not a Charter")
        raise typer.Exit(2)
    return charter


@policy_app.command("matrix")
def policy_matrix(
    roles: Annotated[
        str, typer.Option(help="Comma-separated roles to enumerate.")
    ] = "member,approver,admin,support",
    states: Annotated[
        str | None, typer.Option(help="Comma-separated record states.")
    ] = "draft,submitted,approved",
    fmt: Annotated[str, typer.Option("--format", help="markdown, csv or json.")] = "markdown",
    app_spec: AppOption = None,
    demo: DemoOption = False,
) -> None:
    """Print roles x actions x states -> allow, deny or conditional (with the condition)."""
    charter = _load_app(_app_spec(app_spec, demo))
    matrix = charter.matrix(
        roles=[r.strip() for r in roles.split(",") if r.strip()],
        states=[s.strip() for s in states.split(",") if s.strip()] if states else None,
    )
    renderers = {
        "markdown": matrix.to_markdown,
        "md": matrix.to_markdown,
        "csv": matrix.to_csv,
        "json": matrix.to_json,
    }
    if fmt not in renderers:
        err.print("[red]error:[/red] --format is markdown, csv or json")
        raise typer.Exit(2)
    typer.echo(renderers[fmt](), nl=False)


@workflow_app.command("show")
def workflow_show(
    resource: Annotated[str, typer.Argument(help="The resource, e.g. invoices.")],
    fmt: Annotated[str, typer.Option("--format", help="mermaid or dot.")] = "mermaid",
    app_spec: AppOption = None,
    demo: DemoOption = False,
) -> None:
    """Print RESOURCE's state diagram (its states and the actions that move it)."""
    from .workflow import diagram
    from .workflow.diagram import FORMATS

    charter = _load_app(_app_spec(app_spec, demo))
    workflows = charter.workflows
    if resource not in workflows:
        declared = ", ".join(sorted(workflows)) or "none"
        err.print(f"[red]error:[/red] {resource!r} has no workflow (workflows: {declared})")
        raise typer.Exit(2)
    if fmt not in FORMATS:
        err.print(f"[red]error:[/red] --format is {' or '.join(FORMATS)}")
        raise typer.Exit(2)
    typer.echo(diagram(workflows[resource], fmt), nl=False)


@app.command("pipeline")
def pipeline(
    action: Annotated[str, typer.Argument(help="The action, e.g. invoice.approve.")],
    app_spec: AppOption = None,
    demo: DemoOption = False,
) -> None:
    """List the stages ACTION runs, in order: what happens when it is executed."""
    charter = _load_app(_app_spec(app_spec, demo))
    try:
        stages = charter.pipeline_of(action)
    except CharterError as exc:
        raise _fail(exc) from exc
    typer.echo(f"{action} ({charter.engine.dialect.name}):")
    for number, stage in enumerate(stages, 1):
        where = "" if stage.phase == "transaction" else "  (before the transaction)"
        typer.echo(f"{number:>3}. {stage.name:<15} {stage.summary}{where}")


@idem_app.command("purge")
def idempotency_purge(database_url: DatabaseOption = None) -> None:
    """Delete finished idempotency records past their retention (in-progress ones stay)."""
    removed = _call(database_url, lambda charter: charter.purge_idempotency())
    console.print(f"removed {removed} expired idempotency records")


@idem_app.command("resume")
def idempotency_resume(
    database_url: DatabaseOption = None,
    app_spec: AppOption = None,
    demo: DemoOption = False,
) -> None:
    """Drive abandoned multi-phase requests (their worker died) to a final state, once.

    With --app, your Charter (and its database); with --demo, the reference
    service's actions on --database-url, with its payment provider
    (CHARTER_PAYMENTS_URL).
    """
    payments = None
    if not demo:
        charter = _load_app(_app_spec(app_spec, demo))
    else:
        from .demo.payment_client import PaymentClient
        from .demo.service import build_charter

        settings = _settings(database_url)
        payments = PaymentClient(settings.payments_url) if settings.payments_url else None
        charter = build_charter(_charter(settings), payments=payments)
    try:
        results = charter.resume_abandoned()
    except CharterError as exc:
        raise _fail(exc) from exc
    finally:
        if payments is not None:
            payments.close()
        charter.engine.dispose()
    for key, outcome in results:
        console.print(f"{key}: {outcome}")
    console.print(f"resumed {len(results)} abandoned requests")


@credits_app.command("verify")
def credits_verify(
    database_url: DatabaseOption = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the report as JSON.")] = False,
) -> None:
    """Check that each balance equals the sum of its ledger entries and that the ledger sums
    to zero; exit 1 and name every account that does not."""
    report = _call(database_url, lambda charter: Credits.of(charter).verify(), Settings.for_audit)
    if as_json:
        console.print_json(json.dumps(report.as_json()))
    else:
        for problem in report.problems:
            console.print(f"[red]✗[/red] {problem.subject}: {problem.detail}", highlight=False)
        status = "[green]balanced[/green]" if report.ok else "[red]UNBALANCED[/red]"
        console.print(
            f"{status}: {report.accounts} accounts, {report.movements} movements, "
            f"{len(report.problems)} problems",
            highlight=False,
        )
    if not report.ok:
        raise typer.Exit(1)


@credits_app.command("sweep")
def credits_sweep(database_url: DatabaseOption = None) -> None:
    """Release every hold still pending past its expiry (its credits go back)."""
    released = _call(database_url, lambda charter: Credits.of(charter).sweep(limit=10_000))
    console.print(f"released {released} expired holds")


def _application(app_spec: str, charter_spec: str | None) -> Any:
    """The inventory of APP (``charter check``/``report``): app, its Charter, this CLI."""
    import inspect as _inspect

    from .tools.inventory import inventory

    target = _import(app_spec, "app")
    try:
        # A factory (create_app) is called; an app object is not (ASGI/WSGI apps are callable).
        application = target() if _inspect.isfunction(target) else target
        charter = _load_app(charter_spec) if charter_spec else None
        return inventory(application, charter=charter, cli=app)
    except CharterError as exc:
        err.print(f"[red]error:[/red] {app_spec}: {exc.message}")
        raise typer.Exit(2) from exc


AppArgument = Annotated[
    str,
    typer.Argument(
        metavar="APP",
        help="module:attribute of a FastAPI or Flask app (or of a function returning one).",
    ),
]
CharterOption = Annotated[
    str | None,
    typer.Option("--charter", help="module:attribute of the Charter, if the app does not say."),
]
AcceptOption = Annotated[
    str | None,
    typer.Option("--accept", help="The reviewed accepted-findings file (JSON or YAML)."),
]


def _judged(inv: Any, accept: str | None) -> Any:
    from .tools.accept import judge, load_accepted
    from .tools.check import find

    try:
        return judge(find(inv), load_accepted(accept) if accept else ())
    except CharterError as exc:
        err.print(f"[red]error:[/red] {exc.message}")
        raise typer.Exit(2) from exc


@app.command("check")
def check(
    app_spec: AppArgument,
    fmt: Annotated[str, typer.Option("--format", help="text, json or sarif.")] = "text",
    accept: AcceptOption = None,
    manifest: Annotated[
        str | None,
        typer.Option("--manifest", help="Write the security model's manifest to this file."),
    ] = None,
    frozen: Annotated[
        bool,
        typer.Option("--frozen", help="Fail if the manifest is out of date (do not write it)."),
    ] = False,
    output: Annotated[
        str | None, typer.Option("--output", "-o", help="Write the results here, not stdout.")
    ] = None,
    charter_spec: CharterOption = None,
) -> None:
    """Inventory APP's routes, commands, webhooks and agent tools against its Charter and report
    what bypasses or weakens the gate. Exit 1 on an error not accepted (or a stale --frozen
    manifest), 2 on a usage error; warnings do not change the exit code."""
    from .tools.formats import FORMATS, render
    from .tools.manifest import compare, write_manifest

    if fmt not in FORMATS:
        err.print(f"[red]error:[/red] --format is {', '.join(FORMATS)}")
        raise typer.Exit(2)
    inv = _application(app_spec, charter_spec)
    judged = _judged(inv, accept)
    text = render(fmt, judged, inv)
    if output:
        with open(output, "w", encoding="utf-8") as out:
            out.write(text)
    else:
        typer.echo(text, nl=False)
    code = judged.exit_code
    path = manifest or ("charter.lock.json" if frozen else None)
    if path and frozen:
        drift = compare(inv, path)
        if not drift.fresh:
            err.print(drift.summary(path), markup=False, highlight=False)
            code = 1
    elif path:
        changed = write_manifest(inv, path)
        err.print(f"manifest {path}: {'written' if changed else 'unchanged'}", highlight=False)
    raise typer.Exit(code)


@app.command("report")
def report(
    app_spec: AppArgument,
    output: Annotated[str, typer.Option("--output", "-o", help="The HTML file.")] = "report.html",
    database_url: Annotated[
        str | None,
        typer.Option(
            "--database-url", help="Read audit statistics from this database (none: no charts)."
        ),
    ] = None,
    accept: AcceptOption = None,
    charter_spec: CharterOption = None,
) -> None:
    """Write APP's security model as one self-contained HTML page: actions, permission matrix,
    workflows, route coverage and, with --database-url, audit statistics."""
    from sqlalchemy.exc import SQLAlchemyError

    from .storage import make_engine
    from .tools.report import audit_stats, render_report

    inv = _application(app_spec, charter_spec)
    judged = _judged(inv, accept)
    stats = None
    if database_url:
        engine = make_engine(database_url)
        try:
            with engine.connect() as connection:
                stats = audit_stats(connection)
        except (SQLAlchemyError, CharterError) as exc:
            err.print(f"[red]error:[/red] cannot read the audit trail: {exc}")
            raise typer.Exit(2) from exc
        finally:
            engine.dispose()
    title = app_spec.partition(":")[0]
    with open(output, "w", encoding="utf-8") as out:
        out.write(render_report(inv, judged, stats=stats, title=title))
    console.print(f"report written: {output}", highlight=False)


# -- operators: charter run / export / import (charter.integrations.operator, .batch) ------------

OperatorsOption = Annotated[
    str | None,
    typer.Option(
        "--operators",
        envvar="CHARTER_OPERATORS",
        help="The operator directory: a .json or .toml file, or module:attribute "
        "(default: `operators` in the --app module; the reference service's with --demo).",
    ),
]
AsOption = Annotated[str, typer.Option("--as", help="The operator who acts (its directory id).")]
ReasonOption = Annotated[
    str, typer.Option("--reason", help="Why (mandatory; recorded in the audit trail).")
]
OPERATOR_COMMAND = {"kind": "command", "actions": "*"}  # charter check: it reaches every action


def _operator_gate(
    app_spec: str | None, demo: bool, database_url: str | None, operators: str | None
) -> tuple[Charter, Any]:
    """The Charter and the operator directory an operator command acts through."""
    from .integrations.operator import OperatorDirectory

    if demo:
        from .demo.service import build_charter

        charter = build_charter(_charter(_settings(database_url)))
        default: Any = _import("charter.demo.operators:operators", "operators")
    else:
        spec = _app_spec(app_spec, demo)
        charter = _load_app(spec)
        default = getattr(sys.modules.get(spec.partition(":")[0]), "operators", None)
    source = operators
    try:
        if source is not None and source.endswith((".json", ".toml")):
            return charter, OperatorDirectory.from_file(source)
        found = _import(source, "operators") if source is not None else default
        if found is None:
            raise ConfigurationError(
                "no operator directory: give --operators FILE.json|FILE.toml|module:attribute, "
                "set CHARTER_OPERATORS, or define `operators` in the --app module"
            )
        return charter, OperatorDirectory.of(found)
    except CharterError as exc:
        charter.close()
        err.print(f"[red]error:[/red] {exc.message}", highlight=False)
        raise typer.Exit(2) from exc


def _usage(exc: CharterError) -> typer.Exit:
    """A refusal of the command line itself (nothing ran): exit 2, or 1 for an unknown operator."""
    from .integrations.operator import UnknownOperator

    err.print(f"[red]error[/red] ({exc.code}): {exc.message}", highlight=False)
    return typer.Exit(1 if isinstance(exc, UnknownOperator) else 2)


@app.command("run")
def run_command(
    action: Annotated[str, typer.Argument(help="The action, e.g. invoice.void.")],
    as_: AsOption,
    reason: ReasonOption,
    input_: Annotated[
        str | None, typer.Option("--input", help="JSON, @file or @- (stdin); at most 1 MiB.")
    ] = None,
    target: Annotated[str | None, typer.Option("--target", help="The record's id.")] = None,
    key: Annotated[str | None, typer.Option("--key", help="An idempotency key.")] = None,
    operators: OperatorsOption = None,
    app_spec: AppOption = None,
    demo: DemoOption = False,
    database_url: DatabaseOption = None,
) -> None:
    """Run ACTION through the gate as an operator, on channel cli, with a reason; print the
    outcome and its audit entry as JSON. Exit 1 when refused, 2 on a usage error."""
    from .integrations import operator as ops

    charter, directory = _operator_gate(app_spec, demo, database_url, operators)
    try:
        try:
            actor = directory.resolve(as_)
            ran = ops.run_action(charter, actor, action, ops.parse_input(input_),
                                 reason=reason, target=target, key=key)  # fmt: skip
        except CharterError as exc:
            raise _usage(exc) from exc
    finally:
        charter.close()
    typer.echo(ops.dumps(ran.as_json()))
    if ran.error is not None:
        raise _fail(ran.error)


run_command.__charter__ = OPERATOR_COMMAND  # type: ignore[attr-defined]


@app.command("export")
def export_command(
    action: Annotated[str, typer.Argument(help="The export action, e.g. invoice.export.")],
    as_: AsOption,
    reason: ReasonOption,
    fmt: Annotated[str, typer.Option("--format", help="csv or jsonl.")] = "csv",
    sort: Annotated[str | None, typer.Option("--sort", help="A field; -field descending.")] = None,
    filters: Annotated[
        list[str] | None, typer.Option("--filter", help="field=value (repeatable).")
    ] = None,
    output: Annotated[
        str | None, typer.Option("--output", "-o", help="Write to this file, not stdout.")
    ] = None,
    operators: OperatorsOption = None,
    app_spec: AppOption = None,
    demo: DemoOption = False,
    database_url: DatabaseOption = None,
) -> None:
    """Stream ACTION's export as an operator through the same path as HTTP (counted, charged,
    audited at start and end). With -o, the file appears only once the export completed."""
    from .integrations import operator as ops

    charter, directory = _operator_gate(app_spec, demo, database_url, operators)
    part = f"{output}.part" if output else None
    try:
        try:
            actor = directory.resolve(as_)
            where = ops.parse_filters(filters or ())
            ops.require_reason(reason)
        except CharterError as exc:
            raise _usage(exc) from exc
        with open(part, "wb") if part else nullcontext(sys.stdout.buffer) as out:
            done = ops.export_to(charter, actor, action, out, reason=reason, format=fmt,
                                 sort=sort, where=where)  # fmt: skip
        if part and output:
            os.replace(part, output)
    except CharterError as exc:
        raise _fail(exc) from exc
    finally:
        charter.close()
        if part and os.path.exists(part):
            os.unlink(part)
    err.print(f"exported {done.rows} rows ({done.digest})", highlight=False)


export_command.__charter__ = OPERATOR_COMMAND  # type: ignore[attr-defined]


@app.command("import")
def import_command(
    file: Annotated[str, typer.Argument(help="A .csv (header row first) or .jsonl file.")],
    action: Annotated[str, typer.Option("--action", help="The action each row runs.")],
    as_: AsOption,
    reason: ReasonOption,
    import_id: Annotated[
        str | None, typer.Option("--import-id", help="Names this import (default: file name).")
    ] = None,
    results: Annotated[
        str | None, typer.Option("--results", help="Each row's result (.jsonl or .csv).")
    ] = None,
    target_column: Annotated[
        str | None, typer.Option("--target-column", help="The column of the record id (id).")
    ] = None,
    operators: OperatorsOption = None,
    app_spec: AppOption = None,
    demo: DemoOption = False,
    database_url: DatabaseOption = None,
) -> None:
    """Run each row of FILE through ACTION as an operator, on channel batch, once: an import
    run again replays the rows already applied. Exit 1 if any row was not applied."""
    from .integrations import batch

    charter, directory = _operator_gate(app_spec, demo, database_url, operators)
    try:
        try:
            summary = batch.import_file(
                charter, directory.resolve(as_), action, file, reason=reason,
                import_id=import_id, target_column=target_column, results=results,
                progress=batch.terminal_progress if console.is_terminal else None,
            )  # fmt: skip
        except CharterError as exc:
            raise _usage(exc) from exc
    finally:
        charter.close()
    console.print(summary.text(), highlight=False, markup=False)
    if not summary.ok:
        raise typer.Exit(1)


import_command.__charter__ = OPERATOR_COMMAND  # type: ignore[attr-defined]


@app.command("demo")
def demo(
    host: Annotated[
        str, typer.Option(help="Interface to bind (loopback by default).")
    ] = "127.0.0.1",
    port: Annotated[int, typer.Option(envvar="PORT", help="Port (env PORT).")] = 8000,
    database_url: DatabaseOption = None,
) -> None:
    """Migrate and serve the reference service, printing demo tokens and curl lines."""
    import uvicorn

    from .demo.app import DEMO_MIGRATIONS, create_app, demo_scopes
    from .demo.service import DEMO_USERS
    from .tokens import TokenSigner

    os.environ.setdefault("CHARTER_ENV", "development")
    settings = _settings(database_url)
    stub = None
    if settings.payments_url is None:
        if not settings.webhook_secrets:
            err.print("[red]error:[/red] CHARTER_PAYMENTS_WEBHOOK_SECRET is not set")
            raise typer.Exit(2)
        # No provider configured: start the stub provider (loopback only), which
        # sends its signed payment.settled webhooks back to this service.
        from .demo.payments import PaymentProviderStub

        stub = PaymentProviderStub(
            webhook_url=f"http://{host}:{port}/webhooks/payments",
            webhook_secret=settings.webhook_secrets[0],
        )
        settings = dataclasses.replace(settings, payments_url=stub.start())
    charter = _charter(settings)
    upgrade(charter.engine, extra_locations=DEMO_MIGRATIONS)
    application = create_app(settings, charter=charter)
    signer = TokenSigner(settings.token_secrets)
    base = f"http://{host}:{port}"
    table = Table(title="Demo users (tokens valid 12 h)")
    for column in ("tenant", "user", "roles", "token"):
        table.add_column(column, overflow="fold")
    tokens: dict[str, str] = {}
    for (tenant, user_id), user in DEMO_USERS.items():
        tokens[user_id] = signer.issue(user_id, tenant, scopes=demo_scopes(user))
        table.add_row(tenant, user_id, ", ".join(sorted(user.roles)), tokens[user_id])
    console.print(table)
    # ada acting for alice: an agent token (charter mcp serve reads it; the HTTP API refuses it).
    tokens["ada_for_alice"] = application.state.agents.issue(
        DEMO_USERS["acme", "ada"], DEMO_USERS["acme", "alice"],
        scopes={"invoices:read", "invoices:write"},
    )  # fmt: skip
    exports = " ".join(f"{user.upper()}={token}" for user, token in tokens.items())
    if stub is not None:  # the stub provider (POST $PAYMENTS/v1/webhooks/redeliver)
        exports += f" PAYMENTS={settings.payments_url}"
    console.print(f"\n[bold]Try it[/bold] (database: {settings.database_url}):", soft_wrap=True)
    auth = "Authorization: Bearer"
    lines = [
        f"export {exports}",
        f'curl -s -X POST {base}/invoices -H "{auth} $ALICE" -H "Content-Type: application/json" '
        """-d '{"customer": "ACME", "amount": "1200.00"}'""",
        f'curl -s -X POST {base}/invoices/1/submit -H "{auth} $ALICE"',
        f'curl -s -X POST {base}/invoices/1/approve -H "{auth} $ALICE"  # 403: the creator',
        f'curl -s -X POST {base}/invoices/1/approve -H "{auth} $BOB"    # 200',
        f'curl -s {base}/invoices/1 -H "{auth} $GINA"                   # 404: another tenant',
        f'curl -s -X POST {base}/invoices/1/pay -H "{auth} $CAROL" -H "Idempotency-Key: pay-1"',
        f'curl -s {base}/invoices/1 -H "{auth} $BOB"   # paid, once the provider\'s webhook came',
        f'curl -s {base}/approvals -H "{auth} $BOB"',
        "charter audit show invoices 1 && charter audit verify",
    ]
    for line in lines:
        console.print(line, soft_wrap=True, highlight=False, markup=False)

    try:
        uvicorn.run(application, host=host, port=port, log_level="info")
    finally:
        if stub is not None:
            stub.stop()


# -- support impersonation sessions (charter.sessions) ----------------------------------------

support_app = typer.Typer(help="Support impersonation sessions.", no_args_is_help=True)
support_sessions_app = typer.Typer(help="List and revoke sessions.", no_args_is_help=True)
support_app.add_typer(support_sessions_app, name="sessions")
app.add_typer(support_app, name="support")


def _sessions_charter(database_url: str | None, app_spec: str | None, demo: bool) -> Charter:
    """--app's Charter, or the reference service's declarations on --database-url (--demo)."""
    if not demo:
        return _load_app(_app_spec(app_spec, demo))
    from .demo.service import build_charter

    return build_charter(_charter(_settings(database_url)))


@support_sessions_app.command("list")
def support_sessions_list(
    database_url: DatabaseOption = None,
    app_spec: AppOption = None,
    demo: DemoOption = False,
    tenant: Annotated[str | None, typer.Option(help="Only this tenant's sessions.")] = None,
    active: Annotated[bool, typer.Option("--active", help="Only open, unexpired ones.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON lines.")] = False,
) -> None:
    """The newest sessions: who acts for whom, why, until when, and how each ended."""
    from .sessions import ImpersonationSessions

    charter = _sessions_charter(database_url, app_spec, demo)
    try:
        found = ImpersonationSessions.of(charter).stored(tenant=tenant, active=active)
    except CharterError as exc:
        raise _fail(exc) from exc
    finally:
        charter.close()
    for s in found:
        if as_json:
            typer.echo(json.dumps(s, sort_keys=True))
        else:
            console.print(
                f"{s['id']}  {s['tenant']}  {s['support']} -> {s['user']}  {s['status']}  "
                f"{s['opened_at']} .. {s['expires_at']}  {s['reason']}",
                soft_wrap=True, highlight=False, markup=False,
            )  # fmt: skip
    if not found and not as_json:
        console.print("no sessions")


@support_sessions_app.command("revoke")
def support_sessions_revoke(
    session_id: Annotated[str, typer.Argument(help="The session's id.")],
    reason: Annotated[str, typer.Option(help="Why (recorded in the audit trail).")],
    as_: AsOption,
    operators: OperatorsOption = None,
    database_url: DatabaseOption = None,
    app_spec: AppOption = None,
    demo: DemoOption = False,
) -> None:
    """Revoke a session through the gate (channel cli) as an operator: its token is refused from
    now on. The operator is read from the operator directory, as for `charter run` (its tenant,
    roles and scopes decide). Exit 1 when refused or for an unknown operator, 2 on a usage error."""
    from .sessions import ImpersonationSessions

    charter, directory = _operator_gate(app_spec, demo, database_url, operators)
    try:
        try:
            operator = directory.resolve(as_)  # never a name taken on trust (401 unknown_operator)
        except CharterError as exc:
            raise _usage(exc) from exc
        try:
            sessions = ImpersonationSessions.of(charter)
            outcome = sessions.revoke(operator, session_id, reason=reason, channel="cli")
        except CharterError as exc:
            raise _fail(exc) from exc
    finally:
        charter.close()
    console.print(f"session {session_id}: {outcome.body['state']} by {as_}")


mcp_app = typer.Typer(help="Agent tools over MCP (charter.integrations.mcp).", no_args_is_help=True)
app.add_typer(mcp_app, name="mcp")


@mcp_app.command("serve")
def mcp_serve(
    app_spec: Annotated[
        str,
        typer.Option(
            "--app",
            help="module:attribute of an AgentChannel, or of an app holding one as "
            "app.state.agents (or a function returning either).",
        ),
    ],
    transport: Annotated[str, typer.Option(help="stdio or http (streamable HTTP).")] = "stdio",
    host: Annotated[str, typer.Option(help="Interface for http (loopback by default).")] = (
        "127.0.0.1"
    ),
    port: Annotated[int, typer.Option(help="Port for http.")] = 8765,
) -> None:
    """Serve the agent tools. stdio acts as CHARTER_AGENT_TOKEN's agent (no token: refused);
    http asks every request for an agent's bearer token (401 without one)."""
    import inspect as _inspect

    from .integrations.agent import AgentChannel
    from .integrations.mcp import mcp_server

    target = _import(app_spec, "agents")
    try:
        target = target() if _inspect.isfunction(target) else target
        channel = target if isinstance(target, AgentChannel) else None
        if channel is None:
            channel = getattr(getattr(target, "state", None), "agents", None)
        if not isinstance(channel, AgentChannel):
            err.print(f"[red]error:[/red] {app_spec!r} holds no AgentChannel")
            raise typer.Exit(2)
        token = os.environ.get("CHARTER_AGENT_TOKEN") if transport == "stdio" else None
        if transport == "stdio" and not token:
            err.print("[red]error:[/red] stdio needs the agent's token in CHARTER_AGENT_TOKEN")
            raise typer.Exit(2)
        mcp_server(channel, token=token).serve(transport, host=host, port=port)
    except CharterError as exc:
        raise _fail(exc) from exc


def main() -> None:
    app()
