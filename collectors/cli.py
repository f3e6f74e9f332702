"""`meterline collect gpu`: the NVML collector as a command (imports stay inside the command)."""
from __future__ import annotations

from typing import Annotated, Optional

import typer


def register(app: typer.Typer) -> None:
    collect_app = typer.Typer(help="Collect usage at the source (agents use the Python SDK: meterline.collectors.Meter).",
                              no_args_is_help=True)
    app.add_typer(collect_app, name="collect")
    collect_app.command("gpu")(collect_gpu)


def collect_gpu(
    interval: Annotated[float, typer.Option(help="Seconds between samples.", min=0.1)] = 5.0,
    simulate: Annotated[bool, typer.Option("--simulate", help="No GPU needed: a fake node (2 H100s, 1 A100 in MIG mode, "
                                           "agent processes); every record says simulated=true.")] = False,
    once: Annotated[bool, typer.Option("--once", help="Take one sample, publish it, exit.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print every record as a JSON line instead of a table.")] = False,
    node: Annotated[Optional[str], typer.Option(help="Node name (the Kafka key); default: the host name.")] = None,
    publish: Annotated[bool, typer.Option(help="Publish to the gpu topic (--no-publish only prints).")] = True,
) -> None:
    """Sample every GPU through NVML and publish GpuSample records to <prefix>.gpu.v1, keyed by node.

    Per GPU: utilization, memory, power, energy, temperature; per MIG instance; per process with the agent session that owns it (the SDK's run directory, else METERLINE_SESSION_ID in the process environment). Processes with no known owner are published with attributed=false.

    Examples:  meterline collect gpu --simulate --once --json    ·    meterline collect gpu --interval 10
    """
    import signal
    import socket
    import threading

    from meterline.console import console, err_console, fail
    from meterline.settings import get_settings

    from .attribution import Attributor, SessionRegistry, sessions_dir
    from .gpu import GpuCollector, NvmlUnavailable, load_nvml

    settings = get_settings()
    if simulate:
        from .nvml_fake import SIM_SESSIONS, simulated

        nvml, static = simulated(), SIM_SESSIONS
    else:
        try:
            nvml, static = load_nvml(), None
        except NvmlUnavailable as err:
            fail(f"no NVML ({err}): install the NVIDIA driver, or use --simulate")
    node = node or socket.gethostname()
    collector = GpuCollector(nvml, Attributor(SessionRegistry(sessions_dir(settings.data_dir)), static),
                             node=node, interval_s=interval, simulated=simulate)
    sender = None
    if publish:
        from .sender import Sender

        sender = Sender(settings, settings.topic("gpu"), settings.data_dir / "spool" / f"gpu-{node}")
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())  # a DaemonSet stops pods with SIGTERM: flush, then exit
    try:
        while True:
            if simulate:
                nvml.tick(interval)
            rows = collector.sample()
            for row in rows:
                if sender is not None:
                    sender.send(row.key.encode(), row.to_json())
                if as_json:
                    print(row.model_dump_json(), flush=True)
            if not as_json:
                console.print(_table(rows))
            if once or stop.wait(interval):
                break
    except KeyboardInterrupt:
        pass
    finally:
        if not simulate:
            nvml.nvmlShutdown()
        if sender is not None:
            delivered = sender.flush(10.0)
            sender.close()
            if not delivered:
                err_console.print(f"[yellow]Kafka at {settings.bootstrap} did not take every sample; "
                                  f"{sender.stats.spooled} spooled under {sender.spool_dir} for the next run, "
                                  f"{sender.stats.dropped} dropped[/]")


def _table(rows):
    from meterline.console import table

    def gib(value):
        return "" if value is None else f"{value / (1 << 30):.1f}"

    view = [{
        "gpu": r.gpu_index, "level": r.level, "what": r.mig_profile if r.level == "mig" else (str(r.pid) if r.pid else r.gpu_name),
        "util %": "" if r.utilization_pct is None and r.sm_util_pct is None else str(r.sm_util_pct if r.level == "process" else r.utilization_pct),
        "mem GiB": gib(r.process_memory_bytes if r.level == "process" else r.memory_used_bytes),
        "power W": "" if r.power_mw is None else f"{r.power_mw / 1000:.0f}",
        "session": (f"{r.tenant_id}/{r.session_id}" if r.attributed else "unattributed") if r.level == "process" else "",
    } for r in rows]
    return table(view, title=f"GPU samples from {rows[0].node}" + (" (simulated)" if rows and rows[0].simulated else "") if rows else "no GPUs")
