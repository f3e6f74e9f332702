"""`meterline collect gpu` (the NVML collector), `meterline collect dcgm` (the DCGM exporter as a source) and `meterline gpu assign` (who holds a GPU) as commands;
imports stay inside the commands."""
from __future__ import annotations

from datetime import datetime
from pathlib import Path
from typing import Annotated, Optional

import typer


def register(app: typer.Typer) -> None:
    collect_app = typer.Typer(help="Collect usage at the source (agents use the Python SDK: meterline.collectors.Meter).",
                              no_args_is_help=True)
    app.add_typer(collect_app, name="collect")
    collect_app.command("gpu")(collect_gpu)
    collect_app.command("dcgm")(collect_dcgm)
    collect_app.command("node")(collect_node)
    gpu_app = typer.Typer(help="GPU capacity: who holds each device or MIG slice (charged its idle time under the "
                               "`owner` policy, METERLINE_GPU_IDLE_POLICY).", no_args_is_help=True)
    app.add_typer(gpu_app, name="gpu")
    gpu_app.command("assign")(gpu_assign)


def publish_allocations(settings, allocations) -> None:
    """GpuAllocation records to the compacted gpu-allocations topic, keyed by allocation_id."""
    from confluent_kafka import Producer

    producer = Producer(settings.kafka_config(**{"enable.idempotence": True, "linger.ms": 0}))
    for allocation in allocations:
        producer.produce(settings.topic("gpu-allocations"), key=allocation.allocation_id.encode(), value=allocation.to_json())
    if producer.flush(15):
        raise RuntimeError(f"the allocation was not acknowledged by {settings.bootstrap} within 15 s")


def gpu_assign(
    node: Annotated[str, typer.Option(help="Node name, as the collector publishes it (`collect gpu --node`).")],
    gpu: Annotated[str, typer.Option(help="GPU UUID (nvidia-smi -L; `meterline report gpu` lists them).")],
    tenant: Annotated[str, typer.Option(help="The tenant that holds the device from --since.")],
    mig: Annotated[str, typer.Option(help="A MIG slice's UUID, to assign one slice (default: the whole device).")] = "",
    team: Annotated[str, typer.Option(help="Team within the tenant that holds it.")] = "",
    project: Annotated[str, typer.Option(help="Project within the team.")] = "",
    since: Annotated[Optional[datetime], typer.Option(help="Start (ISO time, UTC if no zone; default now).")] = None,
    until: Annotated[Optional[datetime], typer.Option(help="End (default: until a newer assignment).")] = None,
    allocation_id: Annotated[Optional[str], typer.Option("--id", help="Record id (default: a new one).")] = None,
) -> None:
    """Record that a tenant holds a GPU (or one MIG slice) from --since until --until.

    With METERLINE_GPU_IDLE_POLICY=owner the holder is charged the device's idle time; with
    `proportional` it is charged when nobody used the device in an hour. The newest assignment
    covering a moment wins, so reassigning never rewrites history.

    Example:  meterline gpu assign --node gpu-node-1 --gpu GPU-8f3a... --tenant acme --team research
    """
    from meterline.console import console, fail
    from meterline.errors import require_kafka
    from meterline.schemas.events import GpuAllocation, InvalidEvent, build, new_id, utcnow
    from meterline.settings import get_settings

    def aware(value: datetime | None) -> datetime | None:
        return value if value is None or value.tzinfo else value.replace(tzinfo=utcnow().tzinfo)

    try:
        allocation = build(GpuAllocation, allocation_id=allocation_id or str(new_id()), node=node, gpu_uuid=gpu,
                           mig_uuid=mig, tenant_id=tenant, team=team, project=project,
                           valid_from=aware(since) or utcnow(), valid_until=aware(until))
    except (InvalidEvent, ValueError) as err:
        fail(f"{err}. See `meterline gpu assign --help`.")
    settings = get_settings()
    require_kafka(settings)
    try:
        publish_allocations(settings, [allocation])
    except Exception as err:  # noqa: BLE001
        fail(f"could not publish the assignment to {settings.bootstrap}: {err}. Is Kafka running (`meterline kafka start`)?")
    console.print(f"{allocation.node}/{allocation.mig_uuid or allocation.gpu_uuid} held by "
                  f"{'/'.join(p for p in (tenant, team, project) if p)} from {allocation.valid_from:%Y-%m-%d %H:%M:%S} UTC",
                  markup=False, highlight=False)


def collect_gpu(
    interval: Annotated[float, typer.Option(help="Seconds between samples.", min=0.1)] = 5.0,
    simulate: Annotated[bool, typer.Option("--simulate", help="No GPU needed: a fake node (2 H100s, 1 A100 in MIG mode, "
                                           "agent processes); every record says simulated=true.")] = False,
    once: Annotated[bool, typer.Option("--once", help="Take one sample, publish it, exit.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print every record as a JSON line instead of a table.")] = False,
    node: Annotated[Optional[str], typer.Option(help="Node name (the Kafka key); default: the host name.")] = None,
    publish: Annotated[bool, typer.Option(help="Publish to the gpu topic (--no-publish only prints).")] = True,
    tenant: Annotated[Optional[str], typer.Option(help="The tenant that holds this node's GPUs (a dedicated node): "
                                                       "published as GpuAllocation records from now on, see `meterline gpu assign`.")] = None,
    team: Annotated[str, typer.Option(help="With --tenant: the team that holds them.")] = "",
) -> None:
    """Sample every GPU through NVML and publish GpuSample records to the gpu topic. keyed by node.

    Per GPU: utilization, memory, power, energy, temperature; per MIG instance; per process with the agent session that owns it (the SDK's run directory, else METERLINE_SESSION_ID in the process environment). Processes with no known owner are published with attributed=false.

    Examples:  meterline collect gpu --simulate --once --json    ·    meterline collect gpu --interval 10
    """
    import signal
    import socket
    import threading

    from meterline.console import console, fail
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
            if tenant is not None and publish:
                publish_allocations(settings, _node_held_by(rows, tenant, team))
                tenant = None  # once per start: the newest assignment covers what follows
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
            _close_sender(sender, settings)


def collect_node(
    interval: Annotated[float, typer.Option(help="Seconds between samples.", min=0.1)] = 10.0,
    level: Annotated[str, typer.Option(help="`process` (/proc/<pid>/stat and status) or `cgroup` (cgroup v2 groups: "
                                            "containers, pods, services; exited children counted).")] = "process",
    node_class: Annotated[str, typer.Option("--node-class", envvar="METERLINE_NODE_CLASS",
                                            help="The catalog's [compute.<class>] that prices this node ($/vCPU-hour, $/GiB-hour).")] = "default",
    once: Annotated[bool, typer.Option("--once", help="Take a baseline and one sample one interval later, publish, exit.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print every record as a JSON line instead of a table.")] = False,
    node: Annotated[Optional[str], typer.Option(help="Node name; default: the host name.")] = None,
    publish: Annotated[bool, typer.Option(help="Publish to the compute topic (--no-publish only prints).")] = True,
    cgroup_root: Annotated[Path, typer.Option(help="Where the cgroup v2 hierarchy is mounted.")] = Path("/sys/fs/cgroup"),
    proc: Annotated[Path, typer.Option(help="Where the node's /proc is (in a container: the host's, mounted read-only).")] = Path("/proc"),
    pid: Annotated[Optional[list[int]], typer.Option("--pid", metavar="PID", help="Only this process and its descendants (repeatable; "
                                                                  "process level): e.g. one agent's process tree.")] = None,
    pods_url: Annotated[Optional[str], typer.Option(help="A PodList URL (API server: https://kubernetes.default.svc/api/v1/pods"
                                                         "?fieldSelector=spec.nodeName=<node>; or the kubelet's :10250/pods): names "
                                                         "pods and charges a pod labelled meterline.io/tenant to that tenant.")] = None,
    namespaces_url: Annotated[Optional[str], typer.Option(help="A NamespaceList URL: a pod without the label takes its "
                                                              "namespace's meterline.io/tenant (and /team, /project, /agent).")] = None,
    kube_token_file: Annotated[Optional[Path], typer.Option(help="Bearer token for those URLs (default in a pod: its service "
                                                                 "account's token).")] = None,
    kube_ca_file: Annotated[Optional[Path], typer.Option(help="CA bundle for those URLs (default in a pod: its service account's).")] = None,
) -> None:
    """Sample CPU-seconds and memory of every process (or cgroup v2 group) and publish ComputeSample records to the compute topic.

    Per process or group: user + system CPU time in the interval, resident memory (as byte-seconds) and its peak, the
    container and Kubernetes pod its cgroup names, and the agent session that owns it (as `collect gpu`: the SDK's run
    directory, else METERLINE_SESSION_ID in the process environment). Unknown owners are published with attributed=false.
    The first sample is a baseline (nothing is published for it). Priced by the sink per --node-class.

    Examples:  meterline collect node --once --json --no-publish    ·    meterline collect node --level cgroup --node-class n2
               meterline collect node --pid 4242 --interval 2   (one agent's process tree only)
    """
    import signal
    import socket
    import threading

    from meterline.console import console, err_console, fail
    from meterline.settings import get_settings

    from .attribution import Attributor, SessionRegistry, sessions_dir
    from .kube import PodDirectory
    from .node import NodeCollector

    settings = get_settings()
    node = node or socket.gethostname()
    try:
        directory = PodDirectory(pods_url, namespaces_url, token_file=kube_token_file, ca_file=kube_ca_file) if pods_url else None
        collector = NodeCollector(Attributor(SessionRegistry(sessions_dir(settings.data_dir), proc=proc)), node=node,
                                  node_class=node_class, level=level, proc=proc, cgroup_root=cgroup_root, interval_s=interval,
                                  roots=set(pid or ()), directory=directory)
        if pid and level != "process":
            raise ValueError("--pid selects processes: use it with --level process")
    except ValueError as err:
        fail(f"{err}. See `meterline collect node --help`.")
    if level == "cgroup" and not (cgroup_root / "cgroup.controllers").exists():
        fail(f"{cgroup_root} is not a cgroup v2 hierarchy (no cgroup.controllers); use --level process or --cgroup-root")
    sender = None
    if publish:
        from .sender import Sender

        sender = Sender(settings, settings.topic("compute"), settings.data_dir / "spool" / f"node-{node}")
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    collector.sample()  # the baseline
    try:
        while not stop.wait(interval):
            rows = collector.sample()
            for row in rows:
                if sender is not None:
                    sender.send(row.key.encode(), row.to_json())
                if as_json:
                    print(row.model_dump_json(), flush=True)
            if not as_json:
                console.print(_node_table(rows, node))
            if once:
                break
    except KeyboardInterrupt:
        pass
    finally:
        if sender is not None:
            delivered = sender.flush(10.0)
            sender.close()
            if not delivered:
                err_console.print(f"[yellow]Kafka at {settings.bootstrap} did not take every sample; "
                                  f"{sender.stats.spooled} spooled under {sender.spool_dir} for the next run, "
                                  f"{sender.stats.dropped} dropped[/]")


def _node_table(rows, node: str):
    from meterline.console import table

    top = sorted(rows, key=lambda r: (-r.cpu_seconds, -r.memory_bytes))[:20]
    view = [{"what": str(r.pid) if r.pid is not None else r.cgroup, "container": r.container_id[:12],
             "pod": f"{r.namespace}/{r.pod}" if r.pod else r.pod_uid, "cpu s": f"{r.cpu_seconds:.2f}",
             "mem MiB": f"{r.memory_bytes / (1 << 20):.0f}", "peak MiB": f"{r.memory_peak_bytes / (1 << 20):.0f}",
             "session": f"{r.tenant_id}/{r.session_id}" if r.attributed else "unattributed"} for r in top]
    return table(view, title=f"CPU and memory on {node}: top {len(top)} of {len(rows)}" if rows else "no processes")


def collect_dcgm(
    url: Annotated[str, typer.Option(help="The exporter's page, e.g. http://NODE:9400/metrics.")],
    interval: Annotated[float, typer.Option(help="Seconds between scrapes (the exporter refreshes every 30 s by default).",
                                            min=0.1)] = 30.0,
    pods_file: Annotated[Optional[Path], typer.Option("--pods-file", envvar="METERLINE_DCGM_PODS_FILE",
                                                      help='Who owns each pod: TOML or JSON, [pods."NAMESPACE/POD"] (POD may be a glob) '
                                                           "with tenant_id, team, project, agent_id, session_id.")] = None,
    once: Annotated[bool, typer.Option("--once", help="Scrape once, publish, exit (1 when the scrape failed).")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print every record as a JSON line instead of a table.")] = False,
    node: Annotated[Optional[str], typer.Option(help="Node name (the Kafka key); default: the exporter's Hostname label.")] = None,
    publish: Annotated[bool, typer.Option(help="Publish to the gpu topic (--no-publish only prints).")] = True,
    timeout: Annotated[float, typer.Option(help="Seconds to wait for the page.", min=0.1)] = 5.0,
) -> None:
    """Scrape NVIDIA's DCGM exporter and publish its GPUs, MIG instances and pods as GpuSample records to the gpu topic.

    For clusters that already run dcgm-exporter: no second GPU daemon. Each pod on a GPU or MIG instance is a process
    row charged 1/n of it (time-slicing: --kubernetes-virtual-gpus on the exporter), attributed by --pods-file or by an
    SDK session that names its pod (METERLINE_POD_NAME / METERLINE_POD_NAMESPACE); unknown pods are published with
    attributed=false. A failed scrape is a warning and a retry.

    Example:  meterline collect dcgm --url http://gpu-node-1:9400/metrics --pods-file pods.toml
    """
    import signal
    import threading
    import urllib.parse

    from meterline.console import console, err_console, fail
    from meterline.settings import get_settings

    from .attribution import SessionRegistry, sessions_dir
    from rich.markup import escape

    from .dcgm import DcgmSource, PodOwners, ScrapeError

    settings = get_settings()
    registry = SessionRegistry(sessions_dir(settings.data_dir))
    try:
        owners = PodOwners.from_file(pods_file, registry) if pods_file else PodOwners(registry=registry)
    except ValueError as err:
        fail(str(err))
    source = DcgmSource(url, owners, node=node, interval_s=interval, timeout_s=timeout)
    sender = None
    if publish:
        from .sender import Sender

        where = node or urllib.parse.urlsplit(url).hostname or "exporter"
        sender = Sender(settings, settings.topic("gpu"), settings.data_dir / "spool" / f"dcgm-{''.join(c if c.isalnum() or c in '.-' else '_' for c in where)}")
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    failed = False
    try:
        while True:
            try:
                scrape = source.sample()
                failed = False
            except ScrapeError as err:
                err_console.print(f"[yellow]DCGM scrape failed: {escape(str(err))}; "
                                  f"{'giving up (--once)' if once else f'retrying in {interval:g} s'}[/]", highlight=False, soft_wrap=True)
                failed = True
            else:
                if scrape.skipped:
                    err_console.print(f"[yellow]skipped {scrape.skipped} of {scrape.series} DCGM series (malformed)[/]")
                for row in scrape.rows:
                    if sender is not None:
                        sender.send(row.key.encode(), row.to_json())
                    if as_json:
                        print(row.model_dump_json(), flush=True)
                if not as_json:
                    console.print(_table(scrape.rows))
            if once or stop.wait(interval):
                break
    except KeyboardInterrupt:
        pass
    finally:
        if sender is not None:
            _close_sender(sender, settings)
    if once and failed:
        raise typer.Exit(1)


def _close_sender(sender, settings) -> None:
    """Flush what is queued; say what was spooled for the next run (or dropped) when Kafka did not take it all."""
    from meterline.console import err_console

    delivered = sender.flush(10.0)
    sender.close()
    if not delivered:
        err_console.print(f"[yellow]Kafka at {settings.bootstrap} did not take every sample; {sender.stats.spooled} "
                          f"spooled under {sender.spool_dir} for the next run, {sender.stats.dropped} dropped[/]")


def _node_held_by(rows, tenant: str, team: str):
    from meterline.console import fail
    from meterline.schemas.events import GpuAllocation, InvalidEvent, build, new_id

    try:
        return [build(GpuAllocation, allocation_id=str(new_id()), node=r.node, gpu_uuid=r.gpu_uuid, tenant_id=tenant,
                      team=team, valid_from=r.ts) for r in rows if r.level == "gpu"]
    except InvalidEvent as err:
        fail(f"{err}. See `meterline collect gpu --help`.")


def _table(rows):
    from meterline.console import table

    def gib(value):
        return "" if value is None else f"{value / (1 << 30):.1f}"

    view = [{
        "gpu": r.gpu_index, "level": r.level, "what": r.mig_profile if r.level == "mig" else (str(r.pid) if r.pid else (f"{r.namespace}/{r.pod}" if r.pod else r.gpu_name)),
        "util %": "" if r.utilization_pct is None and r.sm_util_pct is None else str(r.sm_util_pct if r.level == "process" else r.utilization_pct),
        "mem GiB": gib(r.process_memory_bytes if r.level == "process" else r.memory_used_bytes),
        "power W": "" if r.power_mw is None else f"{r.power_mw / 1000:.0f}",
        "session": (f"{r.tenant_id}/{r.session_id}" if r.attributed else "unattributed") if r.level == "process" else "",
    } for r in rows]
    return table(view, title=f"GPU samples from {rows[0].node}" + (" (simulated)" if rows and rows[0].simulated else "") if rows else "no GPUs")
