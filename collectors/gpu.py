"""NVML GPU collector: per-GPU, per-MIG-instance and per-process samples, attributed to agent sessions.

`GpuCollector(nvml).sample()` returns `GpuSample` records for one interval:

* level="gpu": utilization, memory used/total, power (mW), energy delta (mJ) since the
  previous sample, temperature. The first sample has no energy delta (None); when the
  counter goes backwards (driver reload, GPU reset) the delta is the counter itself,
  i.e. the energy since the reset.
* level="mig" (MIG mode on): one row per MIG device with its profile, memory and
  `mig_slices / mig_total_slices` = compute-instance slices / slices of the whole GPU
  (largest GPU-instance profile), so GPU-seconds can be charged by fraction.
* level="process": pid, GPU memory, SM utilization averaged over NVML's samples since
  the previous sample (no samples in the interval → 0), the MIG device it runs on, and
  the owning session (see attribution.py); unknown owners get attributed=False.

Every NVML call goes through `_call`: NotSupported / NoPermission / NoData yield None for
that metric instead of an exception. `nvml` is the pynvml module or anything with its API
(nvml_fake.FakeNvml for tests and --simulate).
"""
from __future__ import annotations

import socket
import time
from typing import Any, Callable

from meterline.schemas import InvalidEvent, build, new_id, utcnow
from meterline.schemas.events import GpuSample

from .attribution import Attributor


class NvmlUnavailable(RuntimeError):
    """NVML (the NVIDIA driver's management library) could not be loaded or initialised."""


def load_nvml():
    """Import and initialise pynvml; NvmlUnavailable with the reason when there is no driver."""
    try:
        import pynvml
    except ImportError as err:  # pragma: no cover - nvidia-ml-py is a dependency
        raise NvmlUnavailable(f"nvidia-ml-py is not installed ({err})") from None
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError as err:
        raise NvmlUnavailable(str(err)) from None
    return pynvml


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _pct(value: Any) -> int | None:
    return None if value is None else max(0, min(100, int(value)))


class GpuCollector:
    def __init__(self, nvml: Any, attributor: Attributor, *, node: str | None = None, interval_s: float = 5.0,
                 simulated: bool = False, clock: Callable[[], float] = time.monotonic):
        self.nvml = nvml
        self.attributor = attributor
        self.node = node or socket.gethostname()
        self.interval_ms = max(1, int(interval_s * 1000))
        self.simulated = simulated
        self.clock = clock
        self._unsupported = (nvml.NVMLError_NotSupported, nvml.NVMLError_NoPermission, nvml.NVMLError_NoData)
        self._last_clock: float | None = None
        self._energy: dict[str, int] = {}
        self._util_seen_us: dict[str, int] = {}
        self._total_slices: dict[str, int] = {}

    def _call(self, fn: Callable, *args: Any) -> Any:
        """One NVML call; None when the device does not support (or allow) it."""
        try:
            return fn(*args)
        except self._unsupported:
            return None

    # ---- one interval ----------------------------------------------------------------------

    def sample(self) -> list[GpuSample]:
        now = self.clock()
        interval_ms = self.interval_ms if self._last_clock is None else max(1, min(3_600_000, int((now - self._last_clock) * 1000)))
        self._last_clock = now
        ts = utcnow()
        rows: list[GpuSample] = []
        for index in range(self.nvml.nvmlDeviceGetCount()):
            rows.extend(self._sample_gpu(index, ts, interval_ms))
        return rows

    def _sample_gpu(self, index: int, ts, interval_ms: int) -> list[GpuSample]:
        nv = self.nvml
        handle = nv.nvmlDeviceGetHandleByIndex(index)
        uuid = _text(nv.nvmlDeviceGetUUID(handle))
        common = {"ts": ts, "node": self.node, "gpu_index": index, "gpu_uuid": uuid,
                  "gpu_name": _text(self._call(nv.nvmlDeviceGetName, handle) or ""), "interval_ms": interval_ms,
                  "simulated": self.simulated}
        util = self._call(nv.nvmlDeviceGetUtilizationRates, handle)
        memory = self._call(nv.nvmlDeviceGetMemoryInfo, handle)
        rows = [self._row(level="gpu", **common,
                          utilization_pct=_pct(util.gpu) if util is not None else None,
                          memory_used_bytes=memory.used if memory is not None else None,
                          memory_total_bytes=memory.total if memory is not None else None,
                          power_mw=self._call(nv.nvmlDeviceGetPowerUsage, handle),
                          energy_mj_delta=self._energy_delta(uuid, self._call(nv.nvmlDeviceGetTotalEnergyConsumption, handle)),
                          temperature_c=self._call(nv.nvmlDeviceGetTemperature, handle, nv.NVML_TEMPERATURE_GPU))]
        migs = self._mig_devices(handle, uuid)
        for mig in migs:
            rows.append(self._row(level="mig", **common, **mig["fields"],
                                  utilization_pct=mig["util"], memory_used_bytes=mig["used"], memory_total_bytes=mig["total"]))
        rows.extend(self._process_rows(handle, uuid, migs, common))
        return rows

    def _energy_delta(self, uuid: str, total_mj: int | None) -> int | None:
        if total_mj is None:
            return None
        previous = self._energy.get(uuid)
        self._energy[uuid] = total_mj
        if previous is None:
            return None  # first sample: no baseline yet
        return total_mj - previous if total_mj >= previous else total_mj  # counter reset: energy since the reset

    # ---- MIG -------------------------------------------------------------------------------

    def _mig_devices(self, handle, uuid: str) -> list[dict]:
        nv = self.nvml
        mode = self._call(nv.nvmlDeviceGetMigMode, handle)
        if mode is None or mode[0] != nv.NVML_DEVICE_MIG_ENABLE:
            return []
        total = self._whole_gpu_slices(handle, uuid)
        devices = []
        for slot in range(self._call(nv.nvmlDeviceGetMaxMigDeviceCount, handle) or 0):
            try:
                mig = nv.nvmlDeviceGetMigDeviceHandleByIndex(handle, slot)
            except nv.NVMLError_NotFound:
                continue  # an empty slot
            name = _text(self._call(nv.nvmlDeviceGetName, mig) or "")
            attrs = self._call(nv.nvmlDeviceGetAttributes, mig)
            memory = self._call(nv.nvmlDeviceGetMemoryInfo, mig)
            util = self._call(nv.nvmlDeviceGetUtilizationRates, mig)
            devices.append({
                "handle": mig,
                "fields": {"mig_uuid": _text(nv.nvmlDeviceGetUUID(mig)),
                           "mig_profile": name.rsplit("MIG ", 1)[-1] if "MIG " in name else name,
                           "mig_slices": attrs.computeInstanceSliceCount if attrs is not None else 0,
                           "mig_total_slices": total},
                "used": memory.used if memory is not None else None,
                "total": memory.total if memory is not None else None,
                "util": _pct(util.gpu) if util is not None else None,
            })
        return devices

    def _whole_gpu_slices(self, handle, uuid: str) -> int:
        """Slices of the whole GPU: the largest GPU-instance profile's slice count (7 on A100/H100)."""
        if uuid not in self._total_slices:
            nv, best = self.nvml, 0
            for profile in range(nv.NVML_GPU_INSTANCE_PROFILE_COUNT):
                try:
                    best = max(best, nv.nvmlDeviceGetGpuInstanceProfileInfo(handle, profile).sliceCount)
                except nv.NVMLError:
                    continue  # profile not offered on this GPU
            self._total_slices[uuid] = best
        return self._total_slices[uuid]

    # ---- processes -------------------------------------------------------------------------

    def _process_rows(self, handle, uuid: str, migs: list[dict], common: dict) -> list[GpuSample]:
        sm_util = self._sm_utilization(handle, uuid)
        rows, seen = [], set()
        for where, mig_fields in ([(m["handle"], m["fields"]) for m in migs] or [(handle, {})]):
            procs = [p for p in self._running_processes(where) if (p.pid, mig_fields.get("mig_uuid")) not in seen]
            seen.update((p.pid, mig_fields.get("mig_uuid")) for p in procs)
            for proc in procs:  # each row carries the split: the processes on one device share its time
                memory = getattr(proc, "usedGpuMemory", None)
                owner = self.attributor.resolve(proc.pid)
                fields = {**common, **mig_fields, "level": "process", "pid": proc.pid, "device_processes": len(procs),
                          "process_memory_bytes": memory if isinstance(memory, int) else None,
                          "sm_util_pct": None if sm_util is None else sm_util.get(proc.pid, 0)}
                rows.append(self._process_row(fields, owner))
        return rows

    def _running_processes(self, handle) -> list:
        nv = self.nvml
        compute = self._call(nv.nvmlDeviceGetComputeRunningProcesses, handle) or []
        graphics = self._call(nv.nvmlDeviceGetGraphicsRunningProcesses, handle) or []
        return list(compute) + [p for p in graphics if p.pid not in {c.pid for c in compute}]

    def _sm_utilization(self, handle, uuid: str) -> dict[int, int] | None:
        """pid -> mean SM % over NVML's samples since the last call; {} when there were none."""
        nv = self.nvml
        try:
            samples = nv.nvmlDeviceGetProcessUtilization(handle, self._util_seen_us.get(uuid, 0))
        except nv.NVMLError_NotFound:
            return {}  # no samples in this interval: every process gets 0
        except self._unsupported:
            return None  # e.g. MIG: per-process utilization is not available
        per_pid: dict[int, list[int]] = {}
        for s in samples:
            per_pid.setdefault(s.pid, []).append(s.smUtil)
            self._util_seen_us[uuid] = max(self._util_seen_us.get(uuid, 0), s.timeStamp)
        return {pid: _pct(sum(v) / len(v)) for pid, v in per_pid.items()}

    # ---- records ---------------------------------------------------------------------------

    def _process_row(self, fields: dict, owner: dict) -> GpuSample:
        try:
            return self._row(**fields, **owner)
        except InvalidEvent:  # an environment value that breaks the contract: keep the GPU time, unattributed
            return self._row(**fields, attributed=False)

    @staticmethod
    def _row(**fields: Any) -> GpuSample:
        return build(GpuSample, sample_id=new_id(), **fields)
