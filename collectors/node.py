"""Node collector: CPU-seconds and memory of processes or cgroup v2 groups, attributed to agent sessions.

`NodeCollector(attributor).sample()` returns `ComputeSample` records for one interval:

* level="process": every user process (kernel threads, which have no VmRSS, are left out) with its
  user + system CPU time used since the previous sample (/proc/<pid>/stat utime, stime in clock
  ticks), resident memory (VmRSS) and its high-water mark (VmHWM) from /proc/<pid>/status.
* level="cgroup": every cgroup v2 leaf group that holds processes (the root and inner groups count
  their descendants, so they are left out; processes of the root group itself are not seen), from cpu.stat (user_usec,
  system_usec: exited children included, which /proc cannot give), memory.current and memory.peak, and
  cpu.max as the group's CPU limit in cores (cpu_limit_cores: what the idle_cpu anomaly compares use with).

The first call is the baseline and returns nothing (there is no interval before it); a process or
group first seen later started within the interval, so all of its CPU time counts. The CPU time a
process used between the last sample and its exit is not seen in process mode (its cgroup still
counts it: use --level cgroup for short-lived workers). memory_byte_seconds = resident bytes at the
sample × the interval.

The owner is found as for GPU processes (attribution.py: the SDK's run directory for the pid and its
ancestors, then METERLINE_* in its environment); a group by the first of its processes that has an
owner, else by its Kubernetes pod when an SDK session registered that pod. Unknown owners are
published with attributed=False, never dropped. The cgroup path names the container (containerd,
CRI-O, Docker, Podman; systemd and cgroupfs drivers) and the pod UID, resolved to namespace/pod from
the kubelet's /var/log/pods/<namespace>_<pod>_<uid> directories when the node shows them, and from the
Kubernetes pod list when configured (kube.py: a pod or namespace labelled meterline.io/tenant owns the
rows no session claims).

The parsing functions are pure (text in, values out) and tested on fixtures; the collector only
reads files, so `proc` and `cgroup_root` can point at fixture trees.
"""
from __future__ import annotations

import os
import re
import socket
import time
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Any, Callable, Iterator

from meterline.schemas import InvalidEvent, build, new_id, utcnow
from meterline.schemas.events import ComputeSample

from .attribution import Attributor
from .kube import PodDirectory

PLACES = Decimal("1e-12")


def _seconds(count: int, per_second: int) -> Decimal:
    """Exact seconds of a counter (clock ticks, microseconds), to the contract's 12 places."""
    return (Decimal(count) / per_second).quantize(PLACES)


# ---- parsing (pure) ------------------------------------------------------------------------

@dataclass(frozen=True)
class ProcStat:
    ppid: int
    utime: int  # clock ticks
    stime: int
    starttime: int  # clock ticks since boot: with the pid, identifies the process


def parse_stat(text: str) -> ProcStat:
    """/proc/<pid>/stat. The command name (field 2) is in parentheses and may hold spaces or ')'."""
    fields = text.rsplit(")", 1)[1].split()
    # fields[0] is field 3 (state): ppid is field 4, utime 14, stime 15, starttime 22
    return ProcStat(ppid=int(fields[1]), utime=int(fields[11]), stime=int(fields[12]), starttime=int(fields[19]))


def parse_status(text: str) -> tuple[int, int] | None:
    """(VmRSS, VmHWM) in bytes from /proc/<pid>/status; None for a kernel thread (no VmRSS line)."""
    values = {}
    for line in text.splitlines():
        name, _, rest = line.partition(":")
        if name in ("VmRSS", "VmHWM"):
            number, _, unit = rest.strip().partition(" ")
            values[name] = int(number) * (1024 if unit.strip().lower() == "kb" else 1)
    if "VmRSS" not in values:
        return None
    return values["VmRSS"], max(values.get("VmHWM", 0), values["VmRSS"])


def parse_cpu_stat(text: str) -> tuple[int, int]:
    """(user_usec, system_usec) from a cgroup v2 cpu.stat."""
    values = dict(line.split(None, 1) for line in text.splitlines() if line.strip())
    return int(values.get("user_usec", 0)), int(values.get("system_usec", 0))


def parse_cpu_max(text: str) -> Decimal | None:
    """Cores a cgroup v2 cpu.max allows ("<quota> <period>" in microseconds; "max ..." is no limit)."""
    quota, _, period = text.strip().partition(" ")
    if quota == "max" or not period:
        return None
    return (Decimal(int(quota)) / int(period)).quantize(PLACES)


def cgroup_v2_path(text: str) -> str:
    """The unified (v2) hierarchy's path from /proc/<pid>/cgroup: the `0::<path>` line ('' on a v1-only host)."""
    for line in text.splitlines():
        if line.startswith("0::"):
            return line[3:].strip()
    return ""


@dataclass(frozen=True)
class Container:
    runtime: str = ""  # containerd, cri-o, docker, podman; '' when the path does not say (cgroupfs driver)
    container_id: str = ""
    pod_uid: str = ""


_SCOPE = re.compile(r"^(cri-containerd|crio|docker|libpod)-([0-9a-f]{12,64})\.scope$")
_RUNTIMES = {"cri-containerd": "containerd", "crio": "cri-o", "docker": "docker", "libpod": "podman"}
_BARE_ID = re.compile(r"^(?:(crio|docker|libpod|cri-containerd)-)?([0-9a-f]{64})$")
_POD_SYSTEMD = re.compile(r"^kubepods(?:-(?:burstable|besteffort|guaranteed))?-pod([0-9a-f_]{36})\.slice$")
_POD_CGROUPFS = re.compile(r"^pod([0-9a-f-]{36})$")


def container_of(path: str) -> Container:
    """What a cgroup v2 path names. Forms (systemd driver, then cgroupfs):
    /kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod<uid_with_underscores>.slice/cri-containerd-<id>.scope
    /kubepods.slice/kubepods-pod<uid>.slice/crio-<id>.scope        /system.slice/docker-<id>.scope
    /kubepods/burstable/pod<uid>/<id>     /kubepods/pod<uid>/crio-<id>     /docker/<id>
    CRI-O's conmon (crio-conmon-<id>.scope) is the monitor, not the container, and is not matched."""
    runtime = container_id = pod_uid = ""
    for part in path.strip("/").split("/"):
        if found := _POD_SYSTEMD.match(part):
            pod_uid = found.group(1).replace("_", "-")
        elif found := _POD_CGROUPFS.match(part):
            pod_uid = found.group(1)
        elif found := _SCOPE.match(part):
            runtime, container_id = _RUNTIMES[found.group(1)], found.group(2)
        elif found := _BARE_ID.match(part):
            runtime, container_id = _RUNTIMES.get(found.group(1) or "", ""), found.group(2)
    if not runtime and container_id and path.startswith("/docker/"):
        runtime = "docker"
    return Container(runtime, container_id, pod_uid)


def pods_from_log_dirs(names: list[str]) -> dict[str, tuple[str, str]]:
    """pod UID -> (namespace, pod) from the kubelet's /var/log/pods entry names `<namespace>_<pod>_<uid>`
    (Kubernetes names cannot hold '_', so the split is exact)."""
    out = {}
    for name in names:
        parts = name.split("_")
        if len(parts) == 3 and all(parts):
            out[parts[2]] = (parts[0], parts[1])
    return out


def within_trees(readings: list[dict], roots: frozenset[int]) -> list[dict]:
    """The process readings of `roots` and their descendants (by ppid, among the readings themselves)."""
    parent = {r["pid"]: r.get("ppid") for r in readings}
    keep: dict[int, bool] = {}

    def inside(pid: int | None, depth: int = 0) -> bool:
        if pid is None or depth > 64:
            return False
        if pid not in keep:
            keep[pid] = pid in roots or (pid in parent and inside(parent[pid], depth + 1))
        return keep[pid]

    return [r for r in readings if inside(r["pid"])]


# ---- the collector -------------------------------------------------------------------------

class NodeCollector:
    def __init__(self, attributor: Attributor, *, node: str | None = None, node_class: str = "default",
                 level: str = "process", proc: Path = Path("/proc"), cgroup_root: Path = Path("/sys/fs/cgroup"),
                 pods_dir: Path = Path("/var/log/pods"), interval_s: float = 10.0, simulated: bool = False,
                 clock: Callable[[], float] = time.monotonic, clk_tck: int | None = None,
                 roots: frozenset[int] | set[int] | None = None, directory: PodDirectory | None = None):
        if level not in ("process", "cgroup"):
            raise ValueError(f"level must be 'process' or 'cgroup', not {level!r}")
        self.attributor = attributor
        self.node = node or socket.gethostname()
        self.node_class = node_class
        self.level = level
        self.proc, self.cgroup_root, self.pods_dir = Path(proc), Path(cgroup_root), Path(pods_dir)
        self.interval_ms = max(1, int(interval_s * 1000))
        self.simulated = simulated
        self.clock = clock
        self.ticks_per_s = clk_tck or os.sysconf("SC_CLK_TCK")
        self._last_clock: float | None = None
        self._cpu: dict[Any, tuple[int, int]] = {}  # (pid, starttime) or (path, inode) -> cumulative (user, system)
        self.roots = frozenset(roots) if roots else None  # process level: only these pids and their descendants
        self.directory = directory  # the Kubernetes pod list: names and owner labels of this node's pods

    def sample(self) -> list[ComputeSample]:
        now = self.clock()
        baseline = self._last_clock is None
        interval_ms = self.interval_ms if baseline else max(1, min(3_600_000, int((now - self._last_clock) * 1000)))
        self._last_clock = now
        readings = list(self._processes() if self.level == "process" else self._groups())
        if self.roots is not None:
            readings = within_trees(readings, self.roots)
        seen, rows, ts = {}, [], utcnow()
        pods = self._pods() if any(r["container"].pod_uid for r in readings) else {}
        for r in readings:
            seen[r["id"]] = (r["user"], r["system"])
            if baseline:
                continue
            before = self._cpu.get(r["id"], (0, 0))  # first seen: started within the interval
            user, system = max(0, r["user"] - before[0]), max(0, r["system"] - before[1])
            rows.append(self._row(r, ts, interval_ms, user, system, pods))
        self._cpu = seen
        return rows

    # ---- readings: cumulative counters, memory, where, whose ----

    def _processes(self) -> Iterator[dict]:
        for entry in self.proc.iterdir() if self.proc.is_dir() else ():
            if not entry.name.isdigit():
                continue
            try:
                stat = parse_stat((entry / "stat").read_text())
                memory = parse_status((entry / "status").read_text())
                cgroup = cgroup_v2_path((entry / "cgroup").read_text())
            except (OSError, ValueError, IndexError):
                continue  # exited while listed
            if memory is None:
                continue  # a kernel thread: no memory of its own, charged to nobody
            pid = int(entry.name)
            yield {"id": (pid, stat.starttime), "pid": pid, "ppid": stat.ppid, "pids": [pid], "cgroup": cgroup, "container": container_of(cgroup),
                   "user": stat.utime, "system": stat.stime, "memory": memory[0], "peak": memory[1], "per_s": self.ticks_per_s}

    def _groups(self) -> Iterator[dict]:
        for directory, subdirs, files in os.walk(self.cgroup_root):
            if "cgroup.procs" not in files or "cpu.stat" not in files or subdirs:
                continue  # a group's cpu.stat counts its descendants too: only leaves, so nothing counts twice
            group = Path(directory)
            try:
                pids = [int(p) for p in (group / "cgroup.procs").read_text().split()]
                if not pids:
                    continue  # an inner node or an empty group: its processes are in its leaves
                user, system = parse_cpu_stat((group / "cpu.stat").read_text())
                current = int((group / "memory.current").read_text()) if "memory.current" in files else 0
                peak = int((group / "memory.peak").read_text()) if "memory.peak" in files else current
                limit = parse_cpu_max((group / "cpu.max").read_text()) if "cpu.max" in files else None
                inode = group.stat().st_ino  # a group removed and made again under the same name starts at 0
            except (OSError, ValueError):
                continue  # removed while listed
            path = "/" + str(group.relative_to(self.cgroup_root)).strip(".").strip("/")
            yield {"id": (path, inode), "pid": None, "pids": pids, "cgroup": path, "container": container_of(path),
                   "user": user, "system": system, "memory": current, "peak": max(peak, current), "per_s": 1_000_000,
                   "limit": limit}

    def _pods(self) -> dict[str, tuple[str, str]]:
        try:
            pods = pods_from_log_dirs([p.name for p in self.pods_dir.iterdir()])
        except OSError:
            pods = {}  # not a Kubernetes node, or not mounted in: the pod UID alone is kept
        if self.directory:
            self.directory.refresh()
            pods.update({uid: (namespace, name) for uid, (namespace, name, _) in self.directory.pods.items()})
        return pods

    def _owner(self, pids: list[int], namespace: str, pod: str, pod_uid: str = "") -> dict:
        """The most specific owner first: a process's session (SDK registry, environment), then a session the
        SDK registered for the pod, then the pod's (or its namespace's) meterline.io/ labels."""
        for pid in pids[:64]:
            owner = self.attributor.resolve(pid)
            if owner["attributed"]:
                return owner
        if pod:
            found = self.attributor.registry.pods().get((namespace, pod))
            if found and found.get("tenant_id"):
                return {**found, "attributed": True}
        labelled = self.directory.owner(pod_uid) if self.directory and pod_uid else {}
        return {**labelled, "attributed": True} if labelled else {"attributed": False}

    def _row(self, r: dict, ts, interval_ms: int, user: int, system: int, pods: dict) -> ComputeSample:
        container: Container = r["container"]
        namespace, pod = pods.get(container.pod_uid, ("", ""))
        fields = {"ts": ts, "node": self.node, "node_class": self.node_class, "level": self.level, "pid": r["pid"],
                  "cgroup": r["cgroup"], "container_id": container.container_id, "runtime": container.runtime,
                  "pod_uid": container.pod_uid, "namespace": namespace, "pod": pod, "interval_ms": interval_ms,
                  "cpu_user_seconds": _seconds(user, r["per_s"]), "cpu_system_seconds": _seconds(system, r["per_s"]),
                  "memory_bytes": r["memory"], "memory_peak_bytes": r["peak"],
                  "memory_byte_seconds": Decimal(r["memory"]) * interval_ms / 1000, "simulated": self.simulated,
                  "cpu_limit_cores": r.get("limit")}
        owner = self._owner(r["pids"], namespace, pod, container.pod_uid)
        try:
            return build(ComputeSample, sample_id=new_id(), **fields, **owner)
        except InvalidEvent:  # an environment value that breaks the contract: keep the usage, unattributed
            return build(ComputeSample, sample_id=new_id(), **fields, attributed=False)
