"""Which agent session owns a process: the `pid -> session` run directory and /proc.

The SDK's Meter writes `<data_dir>/run/sessions/<pid>.json` (atomically: temp file +
rename) whenever its session changes and removes it on close. The GPU collector
resolves a GPU process to a session in this order:

1. the run directory, for the pid itself and then its ancestors (a GPU worker spawned
   by an agent inherits the agent's session). It wins because it is the session the
   agent is in *now*, validated by the SDK; the process start time stored with it
   guards against a recycled pid.
2. `METERLINE_SESSION_ID` / `METERLINE_TENANT_ID` (+ `_TEAM`, `_PROJECT`, `_AGENT_ID`)
   in `/proc/<pid>/environ`, when readable: for GPU jobs that do not use the SDK but
   were launched with the variables set. The environment is frozen at exec time and
   inherited by every child, so it is only the fallback.

A process found in neither is reported with attributed=False, never dropped.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

ENV_KEYS = {
    "tenant_id": "METERLINE_TENANT_ID",
    "team": "METERLINE_TEAM",
    "project": "METERLINE_PROJECT",
    "agent_id": "METERLINE_AGENT_ID",
    "session_id": "METERLINE_SESSION_ID",
}
FIELDS = tuple(ENV_KEYS)
# In a Kubernetes pod (set through the downward API): the registration names its pod, so `collect dcgm`,
# which sees pods and not pids, can attribute the pod's GPU time to the session (a shared run directory).
POD_ENV = {"pod": "METERLINE_POD_NAME", "namespace": "METERLINE_POD_NAMESPACE"}
MAX_ANCESTORS = 8


def sessions_dir(data_dir: Path) -> Path:
    return Path(data_dir) / "run" / "sessions"


def process_start_time(pid: int, proc: Path = Path("/proc")) -> int | None:
    """Clock ticks since boot when `pid` started (field 22 of /proc/<pid>/stat)."""
    try:
        stat = (proc / str(pid) / "stat").read_text()
    except OSError:
        return None
    return int(stat.rsplit(")", 1)[1].split()[19])


def parent_pid(pid: int, proc: Path = Path("/proc")) -> int | None:
    try:
        stat = (proc / str(pid) / "stat").read_text()
    except OSError:
        return None
    return int(stat.rsplit(")", 1)[1].split()[1])


class SessionRegistry:
    """Read/write side of the run directory."""

    def __init__(self, directory: Path, proc: Path = Path("/proc")):
        self.directory = Path(directory)
        self.proc = proc

    def register(self, pid: int, attribution: dict[str, str]) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        record = {"pid": pid, "start_time": process_start_time(pid, self.proc), **{k: attribution.get(k, "") for k in FIELDS},
                  **{k: os.environ[var] for k, var in POD_ENV.items() if os.environ.get(var)}}
        tmp = self.directory / f".{pid}.json.tmp"
        tmp.write_text(json.dumps(record))
        os.replace(tmp, self.directory / f"{pid}.json")

    def unregister(self, pid: int) -> None:
        (self.directory / f"{pid}.json").unlink(missing_ok=True)

    def pods(self) -> dict[tuple[str, str], dict[str, str]]:
        """(namespace, pod) -> attribution, from registrations that name their pod (newest written wins).
        The pid is not checked: it lives in the pod's own pid namespace; a pod's name is not reused."""
        found: list[tuple[float, dict]] = []
        for path in self.directory.glob("*.json") if self.directory.is_dir() else ():
            try:
                found.append((path.stat().st_mtime, json.loads(path.read_text())))
            except (OSError, ValueError):
                continue  # removed or being replaced while listed
        return {(str(r.get("namespace", "")), str(r["pod"])): {k: str(r.get(k, "")) for k in FIELDS}
                for _, r in sorted(found, key=lambda item: item[0]) if isinstance(r, dict) and r.get("pod")}

    def lookup(self, pid: int) -> dict[str, str] | None:
        try:
            record = json.loads((self.directory / f"{pid}.json").read_text())
        except (OSError, ValueError):
            return None
        started = record.get("start_time")
        if started is not None and started != process_start_time(pid, self.proc):
            return None  # the pid was recycled by another process
        return {k: str(record.get(k, "")) for k in FIELDS}


class Attributor:
    """pid -> attribution dict (with `attributed`), by the rules in this module's docstring."""

    def __init__(self, registry: SessionRegistry, static: dict[int, dict[str, str]] | None = None):
        self.registry = registry
        self.static = static or {}

    def resolve(self, pid: int) -> dict:
        found = self.static.get(pid) or self._from_registry(pid) or self._from_environ(pid)
        if found and found.get("tenant_id"):
            return {**{k: found.get(k, "") for k in FIELDS}, "attributed": True}
        return {**{k: "" for k in FIELDS}, "attributed": False}

    def _from_registry(self, pid: int) -> dict[str, str] | None:
        current: int | None = pid
        for _ in range(MAX_ANCESTORS):
            if current is None or current <= 1:
                return None
            found = self.registry.lookup(current)
            if found:
                return found
            current = parent_pid(current, self.registry.proc)
        return None

    def _from_environ(self, pid: int) -> dict[str, str] | None:
        try:
            raw = (self.registry.proc / str(pid) / "environ").read_bytes()
        except OSError:
            return None  # another user's process: only root (or the owner) may read it
        env = dict(item.split(b"=", 1) for item in raw.split(b"\0") if b"=" in item)
        found = {k: env.get(var.encode(), b"").decode(errors="replace") for k, var in ENV_KEYS.items()}
        return found if found["session_id"] or found["tenant_id"] else None
