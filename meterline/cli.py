"""The `meterline` command. Each component registers its own commands (see COMPONENTS)."""
from __future__ import annotations

import importlib
from typing import Annotated

import typer

from .console import console, emit_json, fail, table
from .settings import get_settings

app = typer.Typer(
    help=(
        "meterline meters what AI agents spend (LLM tokens, tool/API calls, GPU time), "
        "prices it exactly, and pushes throttle decisions back to the agents.\n\n"
        "First steps:  meterline kafka start  →  meterline topics create  →  meterline migrate  →  meterline demo\n\n"
        "Settings come from METERLINE_* environment variables (for example METERLINE_KAFKA_BOOTSTRAP, "
        "METERLINE_CLICKHOUSE_DSN, METERLINE_DATA_DIR) or a TOML file named by METERLINE_CONFIG."
    ),
    no_args_is_help=True,
    rich_markup_mode="markdown",
    pretty_exceptions_enable=False,
)
JsonFlag = Annotated[bool, typer.Option("--json", help="Print JSON for machines instead of a table.")]

kafka_app = typer.Typer(help="Run a local single-node Kafka broker (KRaft) for development, tests and the demo.", no_args_is_help=True)
topics_app = typer.Typer(help="Manage meterline's Kafka topics.", no_args_is_help=True)
app.add_typer(kafka_app, name="kafka")
app.add_typer(topics_app, name="topics")

# Modules that add their commands with a `register(app)` function; imports inside
# their commands stay lazy so `meterline --help` is fast.
COMPONENTS = (
    "meterline.sql.cli",
    "meterline.collectors.cli",
    "meterline.streams.cli",
    "meterline.allocator.cli",
    "meterline.app.cli",
    "meterline.app.auth",
)


def _broker():
    from .broker import LocalBroker

    return LocalBroker(get_settings())


@kafka_app.command("start")
def kafka_start(
    as_json: JsonFlag = False,
    timeout: float = typer.Option(90.0, help="Seconds to wait for readiness."),
    secure: bool = typer.Option(False, "--secure", help="SASL/SCRAM-SHA-512 and ACLs: one user per role (also METERLINE_KAFKA_SECURE=1)."),
    env: str = typer.Option(None, "--env", metavar="USER", help="With --secure: print shell exports that make clients use USER (eval them)."),
) -> None:
    """Start the broker (idempotent). Fetches Kafka's jars with Maven on first use.

    Skipped when METERLINE_KAFKA_BOOTSTRAP names an existing cluster (not 127.0.0.1:<METERLINE_KAFKA_PORT>, this
    broker), which must then answer; uses $KAFKA_HOME/libs when set.
    With --secure, creates the users and ACLs of meterline/kafka_acl.py for this topic prefix (again on every start).
    """
    import shlex

    from . import kafka_acl
    from .broker import BrokerError, LocalBroker
    from .errors import EXIT_CODE, UserError

    settings = get_settings()
    if secure and not settings.kafka_secure:
        settings = settings.model_copy(update={"kafka_secure": True})
    if env is not None and env not in kafka_acl.USERS:
        fail(f"--env: no user {env!r}; the users are {', '.join(kafka_acl.USERS)}", code=2)
    if env is not None and not settings.kafka_secure:
        fail("--env needs --secure (a broker without SASL has no users)", code=2)
    broker = LocalBroker(settings)
    try:
        with console.status("starting Kafka (first run downloads its jars with Maven)…"):
            status = broker.start(timeout=timeout)
    except BrokerError as err:
        fail(str(err), code=EXIT_CODE if isinstance(err, UserError) else 1)
    if not settings.kafka_secure or not status.managed:
        if as_json:
            emit_json(status.as_dict())
        else:
            console.print(f"[green]Kafka is up[/] on {status.bootstrap}" + (f" (pid {status.pid})" if status.pid else " (external cluster)"))
        return
    if env is not None:
        exports = {**kafka_acl.client_env(env, broker.credentials()["users"][env]), "METERLINE_KAFKA_SECURE": "1"}
        print("".join(f"export {k}={shlex.quote(v)}\n" for k, v in exports.items()), end="")
        return
    principals = kafka_acl.table(settings)
    if as_json:
        emit_json({**status.as_dict(), "secure": True, "mechanism": kafka_acl.MECHANISM, "topic_prefix": settings.topic_prefix,
                   "credentials_file": str(broker.credentials_file), "principals": principals,
                   "client_env": kafka_acl.client_env("<user>", "<its password in credentials_file>")})
        return
    console.print(f"[green]Kafka is up[/] on {status.bootstrap} (pid {status.pid}): SASL_PLAINTEXT, {kafka_acl.MECHANISM}, "
                  f"ACLs for the topics <{settings.topic_prefix}>.<name>.v1")
    console.print(table([{k: row[k] for k in ("user", "reads", "writes", "groups")} for row in principals]))
    console.print(f"Passwords: {broker.credentials_file} (mode 0600). A client takes a user from METERLINE_KAFKA_SECURITY_PROTOCOL="
                  "SASL_PLAINTEXT, METERLINE_KAFKA_SASL_MECHANISM=SCRAM-SHA-512, METERLINE_KAFKA_SASL_USERNAME and "
                  "METERLINE_KAFKA_SASL_PASSWORD; for example:\n"
                  '  eval "$(meterline kafka start --secure --env pipeline)"; meterline up')


@kafka_app.command("stop")
def kafka_stop() -> None:
    """Stop the broker that `kafka start` started. Data stays for the next start."""
    console.print("stopped" if _broker().stop() else "no meterline broker was running")


@kafka_app.command("status")
def kafka_status(as_json: JsonFlag = False) -> None:
    """Say whether the broker answers; exit code 1 when it does not."""
    status = _broker().status()
    if as_json:
        emit_json(status.as_dict())
    else:
        state = "[green]running[/]" if status.running else "[red]not running[/]"
        console.print(f"Kafka {state} on {status.bootstrap}" + (f", {status.topics} topics" if status.running else ""))
    if not status.running:
        raise typer.Exit(1)


@topics_app.command("create")
def topics_create(as_json: JsonFlag = False, replication_factor: int = typer.Option(1, help="3 on a production cluster.")) -> None:
    """Create every topic in the catalog that does not exist yet (safe to re-run)."""
    from .errors import require_kafka
    from .topics import create_topics

    require_kafka(get_settings())
    try:
        result = create_topics(get_settings(), replication_factor=replication_factor)
    except Exception as err:  # noqa: BLE001 - any client error becomes one line
        fail(f"could not create topics on {get_settings().bootstrap}: {err}. Is Kafka running? Try `meterline kafka start`.")
    if as_json:
        emit_json(result)
    else:
        console.print(table([{"topic": t, "state": s} for t, s in result.items()]))


@topics_app.command("list")
def topics_list(as_json: JsonFlag = False) -> None:
    """Show the topic catalog: names, partitions, retention and compaction."""
    from .topics import CATALOG

    s = get_settings()
    rows = [{"topic": s.topic(t.name), "partitions": t.partitions, "purpose": t.purpose,
             "config": ", ".join(f"{k}={v}" for k, v in t.config.items())} for t in CATALOG]
    emit_json(rows) if as_json else console.print(table(rows))


def _register_components() -> None:
    for name in COMPONENTS:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as err:
            if err.name != name:  # a real missing dependency, not a component still to be written
                raise
            continue
        module.register(app)


_register_components()


def main() -> None:
    """The console script. A common mistake (meterline.errors.UserError, a settings ValidationError)
    is one line on stderr and exit code 2, never a traceback. A crash in native code (librdkafka, chDB)
    prints every thread's Python stack to stderr (faulthandler), so its log says where."""
    import faulthandler
    import sys

    from pydantic import ValidationError

    from .console import error_line
    from .errors import EXIT_CODE, UserError, describe_settings_error

    faulthandler.enable()
    try:
        app()
    except UserError as err:
        error_line(str(err))
        sys.exit(EXIT_CODE)
    except ValidationError as err:
        if err.title not in ("Settings", "KafkaSecurity"):
            raise
        import os

        error_line(describe_settings_error(err, os.environ.get("METERLINE_CONFIG")))
        sys.exit(EXIT_CODE)
