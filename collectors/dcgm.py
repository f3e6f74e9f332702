"""NVIDIA's DCGM exporter as a GPU source: its Prometheus page -> GpuSample records (`meterline collect dcgm`).

`map_page(text, state, owners)` is the whole mapping, pure but for the ids and timestamps it stamps;
`DcgmSource` adds the HTTP scrape. What the exporter writes (dcgm-exporter's default counters and
its Kubernetes pod mapper) and what becomes of it:

* Series: `DCGM_FI_DEV_GPU_UTIL` (%), `DCGM_FI_PROF_GR_ENGINE_ACTIVE` (a 0..1 ratio; the only
  utilization a MIG instance has), `DCGM_FI_DEV_FB_USED` / `_FREE` / `_RESERVED` / `_TOTAL` (MiB),
  `DCGM_FI_DEV_POWER_USAGE` (W), `DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION` (a counter, mJ since boot),
  `DCGM_FI_DEV_GPU_TEMP` (°C). Others are ignored. DCGM's "blank" sentinels (a field the GPU does
  not support) become None, as NVML's NotSupported does in the NVML collector.
* Labels: `gpu` (index), `UUID` (`uuid` with the exporter's old names), `modelName`, `Hostname`
  (`hostname` since the exporter renamed it; the node unless --node says otherwise); a MIG
  instance adds `GPU_I_ID` and `GPU_I_PROFILE` (e.g. `3g.40gb`: 3 of the GPU's 7 slices; 4 on an
  A30); a pod adds `pod`, `namespace`, `container` (`pod_name`, `pod_namespace`, `container_name`).
* Rows: one level="gpu" row per GPU (energy_mj_delta from the counter: None on the first scrape,
  the counter itself after a reset), one level="mig" row per GPU instance (mig_uuid is
  `<GPU UUID>/<GPU_I_ID>`: the exporter has no MIG UUID), one level="process" row per pod on a GPU
  or instance, pid None, with device_processes = the pods on it, so each is charged 1/n.
* Pods and values: without sharing, the exporter labels a device's own series with the pod that
  holds it; with time-slicing (`--kubernetes-virtual-gpus`) it copies each device series once per
  pod, and for GPU_UTIL and FB_USED keeps the device's own series and writes each pod's own value
  (its processes') beside it. So a device value is read from its unlabelled series, else from any
  pod's copy; a pod's sm_util_pct / process_memory_bytes is its own value where the device's
  series is there too, the device's when the pod is alone on it, else None (a copy of the
  device's value says nothing about one pod's share).
* Attribution: `PodOwners`, by (namespace, pod); unknown pods are published attributed=False with
  the pod recorded, never dropped.
* A series the contract cannot take (no UUID, an index that is not a number, NaN, a utilization
  of 150 %) is skipped and counted (`Scrape.skipped`); a page that does not parse is a ScrapeError.
"""
from __future__ import annotations

import fnmatch
import json
import math
import re
import time
import tomllib
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from prometheus_client.parser import text_string_to_metric_families

from meterline.schemas import InvalidEvent, build, new_id, utcnow
from meterline.schemas.events import GpuSample

from .attribution import FIELDS, SessionRegistry

UTIL, GR_ACTIVE = "DCGM_FI_DEV_GPU_UTIL", "DCGM_FI_PROF_GR_ENGINE_ACTIVE"
FB_USED, FB_FREE, FB_RESERVED, FB_TOTAL = (f"DCGM_FI_DEV_FB_{x}" for x in ("USED", "FREE", "RESERVED", "TOTAL"))
POWER, ENERGY, TEMP = "DCGM_FI_DEV_POWER_USAGE", "DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION", "DCGM_FI_DEV_GPU_TEMP"
# metric -> (DCGM blank threshold: values at or above it mean "no value", (min, max) accepted)
METRICS: dict[str, tuple[float, tuple[float, float]]] = {
    UTIL: (0x7FFFFFF0, (0, 100)), GR_ACTIVE: (2.0 ** 47, (0, 1)), TEMP: (0x7FFFFFF0, (-100, 200)),
    FB_USED: (0x7FFFFFF0, (0, math.inf)), FB_FREE: (0x7FFFFFF0, (0, math.inf)),
    FB_RESERVED: (0x7FFFFFF0, (0, math.inf)), FB_TOTAL: (0x7FFFFFF0, (0, math.inf)),
    POWER: (2.0 ** 47, (0, math.inf)), ENERGY: (0x7FFFFFFFFFFFFFF0, (0, math.inf)),
}
UUID_LABELS, MODEL_LABELS, HOST_LABELS = ("UUID", "uuid", "gpu_uuid"), ("modelName", "model_name"), ("Hostname", "hostname")
POD_LABELS = {"pod": ("pod", "pod_name"), "namespace": ("namespace", "pod_namespace"), "container": ("container", "container_name")}
MIB = 1 << 20
PROFILE = re.compile(r"^(?:(\d+)c\.)?(\d+)g\.")  # 3g.40gb, 1g.10gb+me, 1c.3g.40gb (one compute slice of it)
SLICES_OF = {"A30": 4}  # GPUs whose whole MIG geometry is not 7 slices (A100, H100, H200, B200 are 7)


class ScrapeError(RuntimeError):
    """The page could not be had or read (one line, for a warning)."""


class _Malformed(ValueError):
    pass


# ---- who owns a pod ------------------------------------------------------------------------------


class PodOwners:
    """(namespace, pod) -> attribution. The SDK's registrations that name their pod win (the session
    the agent is in now; their blanks are filled from the rules), then the rules of a pods file:
    an exact `namespace/pod` key, else the first glob (`research/trainer-*`, `batch/*`) in file order."""

    def __init__(self, rules: dict[str, dict[str, str]] | None = None, registry: SessionRegistry | None = None):
        self.rules = dict(rules or {})
        self.registry = registry
        self._registered: dict[tuple[str, str], dict[str, str]] = {}

    @classmethod
    def from_file(cls, path: Path, registry: SessionRegistry | None = None) -> "PodOwners":
        """A TOML or JSON file: `[pods."<namespace>/<pod or glob>"]` with tenant_id, team, project,
        agent_id, session_id. ValueError (with the reason) for a file that is not that."""
        path = Path(path)
        try:
            text = path.read_text()
            data = json.loads(text) if path.suffix == ".json" else tomllib.loads(text)
        except (OSError, ValueError) as err:
            raise ValueError(f"cannot read the pods file {path}: {err}") from None
        pods = data.get("pods") if isinstance(data, dict) else None
        if not isinstance(pods, dict):
            raise ValueError(f'{path}: expected a "pods" table of "<namespace>/<pod>" keys')
        for key, owner in pods.items():
            if "/" not in key:
                raise ValueError(f'{path}: pod key "{key}" must be "<namespace>/<pod>" ("<namespace>/*" for all of one)')
            if not isinstance(owner, dict) or set(owner) - set(FIELDS) or not all(isinstance(v, str) for v in owner.values()):
                raise ValueError(f'{path}: pod "{key}" may set only {", ".join(FIELDS)} (as strings)')
        return cls(pods, registry)

    def refresh(self) -> None:
        """Re-read the registrations (once a scrape)."""
        self._registered = self.registry.pods() if self.registry is not None else {}

    def resolve(self, namespace: str, pod: str) -> dict:
        name = f"{namespace}/{pod}"
        rule = self.rules.get(name) or next((v for k, v in self.rules.items() if fnmatch.fnmatchcase(name, k)), {})
        registered = self._registered.get((namespace, pod)) or {}
        found = {k: registered.get(k) or rule.get(k, "") for k in FIELDS}
        return {**found, "attributed": True} if found["tenant_id"] else {**{k: "" for k in FIELDS}, "attributed": False}


# ---- the mapping ---------------------------------------------------------------------------------


@dataclass
class DcgmState:
    """What one scrape leaves for the next: the clock (interval = time between scrapes) and energy counters."""

    interval_ms: int = 30_000  # the first scrape's interval
    last_clock: float | None = None
    energy: dict[str, int] = field(default_factory=dict)

    def interval(self, now: float) -> int:
        interval = self.interval_ms if self.last_clock is None else max(1, min(3_600_000, int((now - self.last_clock) * 1000)))
        self.last_clock = now
        return interval

    def energy_delta(self, uuid: str, total_mj: float | None) -> int | None:
        if total_mj is None:
            return None
        total, previous = int(total_mj), self.energy.get(uuid)
        self.energy[uuid] = total
        if previous is None:
            return None  # first scrape: no baseline yet
        return total - previous if total >= previous else total  # counter reset: the energy since the reset


@dataclass
class Scrape:
    rows: list[GpuSample]
    series: int = 0  # series read (of the metrics above)
    skipped: int = 0  # malformed series left out


@dataclass
class _Entity:
    """A GPU or one MIG instance, with its series: the device's own, pods' copies, and each pod's."""

    index: int
    name: str
    host: str
    gi: str = ""
    profile: str = ""
    own: dict[str, float | None] = field(default_factory=dict)
    copied: dict[str, float | None] = field(default_factory=dict)
    pods: dict[tuple[str, str, str], dict[str, float | None]] = field(default_factory=dict)

    def value(self, metric: str) -> float | None:
        return self.own[metric] if metric in self.own else self.copied.get(metric)

    def utilization(self) -> int | None:
        return _util(self.value(UTIL), self.value(GR_ACTIVE))

    def memory_used(self) -> int | None:
        used = self.value(FB_USED)
        return None if used is None else int(used) * MIB

    def memory_total(self) -> int | None:
        if self.value(FB_TOTAL) is not None:
            return int(self.value(FB_TOTAL)) * MIB
        used, free = self.value(FB_USED), self.value(FB_FREE)
        return None if used is None or free is None else int(used + free + (self.value(FB_RESERVED) or 0)) * MIB


def _util(util: float | None, active: float | None) -> int | None:
    if util is not None:
        return int(round(util))
    return None if active is None else int(round(active * 100))


def _label(labels: dict[str, str], names: tuple[str, ...]) -> str:
    return next((labels[n] for n in names if labels.get(n)), "")


def _value(metric: str, value: float) -> float | None:
    blank, (low, high) = METRICS[metric]
    if math.isnan(value) or math.isinf(value):
        raise _Malformed(f"{metric}: {value}")
    if value >= blank:
        return None  # DCGM's blank: the field has no value on this GPU
    if not low <= value <= high:
        raise _Malformed(f"{metric}: {value} outside {low}..{high}")
    return value


def _slices(profile: str, model: str) -> tuple[int, int]:
    match = PROFILE.match(profile)
    if not match:
        raise _Malformed(f"MIG profile {profile!r}")
    total = next((n for key, n in SLICES_OF.items() if key in model), 7)
    slices = int(match.group(1) or match.group(2))
    if not 0 < slices <= total:
        raise _Malformed(f"MIG profile {profile!r} on {model!r}")
    return slices, total


def _read(text: str) -> tuple[dict[str, _Entity], dict[tuple[str, str], _Entity], int, int]:
    """The page's GPUs and MIG instances; (gpus by UUID, instances by (UUID, GPU_I_ID), series, skipped)."""
    try:
        families = list(text_string_to_metric_families(text))
    except ValueError as err:  # the parser's only complaint: a line that is not Prometheus text
        raise ScrapeError(f"not a Prometheus text page ({str(err)[:120]})") from None
    if not any(f.name.startswith("DCGM_") for f in families):
        raise ScrapeError("no DCGM_ series on the page (is this a DCGM exporter's /metrics?)")
    gpus: dict[str, _Entity] = {}
    migs: dict[tuple[str, str], _Entity] = {}
    series = skipped = 0
    for family in families:
        if family.name not in METRICS:
            continue
        for sample in family.samples:
            series += 1
            labels = sample.labels
            try:
                uuid, gi = _label(labels, UUID_LABELS), labels.get("GPU_I_ID", "")
                if not uuid or not labels.get("gpu", "").isdigit():
                    raise _Malformed("no UUID or gpu index")
                if gi and not (gi.isascii() and gi.isdigit()):  # the exporter writes the instance id as a number
                    raise _Malformed(f"GPU_I_ID {gi!r}")
                value = _value(family.name, float(sample.value))
                model = _label(labels, MODEL_LABELS)
                device = gpus.get(uuid) or _Entity(int(labels["gpu"]), model, _label(labels, HOST_LABELS))
                entity = device
                if gi:
                    profile = labels.get("GPU_I_PROFILE", "")
                    _slices(profile, model)
                    entity = migs.get((uuid, gi)) or _Entity(device.index, model, device.host, gi, profile)
            except (_Malformed, ValueError):
                skipped += 1
                continue
            gpus.setdefault(uuid, device)
            if gi:
                migs.setdefault((uuid, gi), entity)
            pod = tuple(_label(labels, POD_LABELS[k]) for k in ("namespace", "pod", "container"))
            if not pod[1]:
                entity.own[family.name] = value
            else:
                entity.copied.setdefault(family.name, value)
                entity.pods.setdefault(pod, {})[family.name] = value
    return gpus, migs, series, skipped


def map_page(text: str, state: DcgmState, owners: PodOwners, *, node: str | None = None, now: float | None = None,
             simulated: bool = False) -> Scrape:
    """One scrape's page -> GpuSample rows. `node` overrides the Hostname label (default: the label,
    else "dcgm"); `now` is the monotonic clock reading of the scrape (interval = time since the last)."""
    gpus, migs, series, skipped = _read(text)
    interval_ms = state.interval(time.monotonic() if now is None else now)
    owners.refresh()
    ts, rows = utcnow(), []
    for uuid, gpu in sorted(gpus.items(), key=lambda item: item[1].index):
        common = {"ts": ts, "node": node or gpu.host or "dcgm", "gpu_index": gpu.index, "gpu_uuid": uuid,
                  "gpu_name": gpu.name, "interval_ms": interval_ms, "simulated": simulated}
        power = gpu.value(POWER)
        temperature = gpu.value(TEMP)
        try:
            rows.append(_row(level="gpu", **common, utilization_pct=gpu.utilization(), memory_used_bytes=gpu.memory_used(),
                             memory_total_bytes=gpu.memory_total(), power_mw=None if power is None else int(round(power * 1000)),
                             energy_mj_delta=state.energy_delta(uuid, gpu.value(ENERGY)),
                             temperature_c=None if temperature is None else int(round(temperature))))
        except InvalidEvent:  # e.g. a node name the contract refuses: the whole GPU is unusable
            skipped += 1
            continue
        rows.extend(_pod_rows(gpu, common, {}, owners))
        for (_, gi), mig in sorted(((k, m) for k, m in migs.items() if k[0] == uuid), key=lambda item: int(item[0][1])):
            slices, total = _slices(mig.profile, mig.name)
            fields = {"mig_uuid": f"{uuid}/{gi}", "mig_profile": mig.profile, "mig_slices": slices, "mig_total_slices": total}
            try:
                rows.append(_row(level="mig", **common, **fields, utilization_pct=mig.utilization(),
                                 memory_used_bytes=mig.memory_used(), memory_total_bytes=mig.memory_total()))
            except InvalidEvent:  # e.g. a profile name the contract refuses: that instance is unusable, the GPU is not
                skipped += 1
                continue
            rows.extend(_pod_rows(mig, common, fields, owners))
    return Scrape(rows, series, skipped)


def _pod_rows(entity: _Entity, common: dict, mig_fields: dict, owners: PodOwners) -> list[GpuSample]:
    rows = []
    alone = len(entity.pods) == 1
    for (namespace, pod, container), values in sorted(entity.pods.items()):
        # the pod's own value where the exporter wrote one beside the device's, the device's where the pod is alone
        util = values.get(UTIL) if UTIL in entity.own else (entity.utilization() if alone else None)
        if FB_USED in entity.own:
            memory = None if values.get(FB_USED) is None else int(values[FB_USED]) * MIB
        else:
            memory = entity.memory_used() if alone else None
        fields = {**common, **mig_fields, "level": "process", "pid": None, "device_processes": len(entity.pods),
                  "namespace": namespace, "pod": pod, "container": container,
                  "sm_util_pct": None if util is None else int(round(util)), "process_memory_bytes": memory}
        try:
            rows.append(_row(**fields, **owners.resolve(namespace, pod)))
        except InvalidEvent:  # an owner the contract refuses: keep the GPU time, unattributed
            try:
                rows.append(_row(**fields, attributed=False))
            except InvalidEvent:  # nor the pod's names: keep the GPU time all the same
                rows.append(_row(**{**fields, "namespace": "", "pod": "", "container": ""}, attributed=False))
    return rows


def _row(**fields: Any) -> GpuSample:
    return build(GpuSample, sample_id=new_id(), **fields)


# ---- the scrape ----------------------------------------------------------------------------------


class DcgmSource:
    """GET the exporter's page and map it; every failure to get or read it is a ScrapeError."""

    def __init__(self, url: str, owners: PodOwners, *, node: str | None = None, interval_s: float = 30.0,
                 timeout_s: float = 5.0, clock: Callable[[], float] = time.monotonic):
        self.url, self.owners, self.node, self.timeout_s, self.clock = url, owners, node, timeout_s, clock
        self.state = DcgmState(interval_ms=max(1, int(interval_s * 1000)))

    def fetch(self) -> str:
        request = urllib.request.Request(self.url, headers={"Accept": "text/plain"})
        try:
            with urllib.request.urlopen(request, timeout=self.timeout_s) as response:
                return response.read(64 << 20).decode("utf-8")
        except urllib.error.HTTPError as err:
            raise ScrapeError(f"{self.url} answered {err.code} {err.reason}") from None
        except (urllib.error.URLError, OSError) as err:
            reason = getattr(err, "reason", err)
            raise ScrapeError(f"cannot reach {self.url}: {reason}") from None
        except UnicodeDecodeError:
            raise ScrapeError(f"{self.url} did not answer UTF-8 text") from None

    def sample(self) -> Scrape:
        text = self.fetch()
        return map_page(text, self.state, self.owners, node=self.node, now=self.clock())
