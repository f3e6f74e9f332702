"""A stand-in for the pynvml module: same function names, structs' fields and error classes.

Used by `meterline collect gpu --simulate` (see `simulated()`) and by the tests, which
describe exact devices, unsupported calls and counter resets with `FakeGpu`.
"""
from __future__ import annotations

import random
from dataclasses import dataclass, field
from types import SimpleNamespace

import pynvml

GIB = 1 << 30


@dataclass
class FakeProcess:
    pid: int
    memory: int | None
    sm_samples: list[int] = field(default_factory=list)  # SM % samples in the next interval; [] = no samples


@dataclass
class FakeMig:
    uuid: str
    profile: str  # e.g. "3g.40gb"
    gi_id: int
    slices: int
    memory_total: int
    memory_used: int
    processes: list[FakeProcess] = field(default_factory=list)


@dataclass
class FakeGpu:
    uuid: str
    name: str
    memory_total: int
    memory_used: int = 0
    util: int = 0
    power_mw: int = 300_000
    energy_mj: int = 0
    temperature: int = 40
    total_slices: int = 7
    migs: list[FakeMig] | None = None  # None: MIG off
    processes: list[FakeProcess] = field(default_factory=list)
    unsupported: set[str] = field(default_factory=set)  # function names that raise NotSupported


class FakeNvml:
    """Module-like: `collector = GpuCollector(FakeNvml([...]), ...)`."""

    NVMLError = pynvml.NVMLError
    NVML_TEMPERATURE_GPU = pynvml.NVML_TEMPERATURE_GPU
    NVML_DEVICE_MIG_ENABLE = pynvml.NVML_DEVICE_MIG_ENABLE
    NVML_DEVICE_MIG_DISABLE = pynvml.NVML_DEVICE_MIG_DISABLE
    NVML_GPU_INSTANCE_PROFILE_COUNT = pynvml.NVML_GPU_INSTANCE_PROFILE_COUNT

    def __init__(self, gpus: list[FakeGpu]):
        self.gpus = gpus
        self.initialised = False
        self._timestamp_us = 1_000_000

    def __getattr__(self, name: str):
        if name.startswith("NVMLError_"):
            return getattr(pynvml, name)  # the real error classes, so `except pynvml.NVMLError_X` works
        raise AttributeError(name)

    @staticmethod
    def _error(code: int) -> pynvml.NVMLError:
        return pynvml.NVMLError(code)  # pynvml maps the code to its subclass

    def _check(self, device, fn: str) -> None:
        gpu = device if isinstance(device, FakeGpu) else device[0]
        if fn in gpu.unsupported:
            raise self._error(pynvml.NVML_ERROR_NOT_SUPPORTED)

    # ---- the pynvml API subset the collector uses -------------------------------------------

    def nvmlInit(self) -> None:
        self.initialised = True

    def nvmlShutdown(self) -> None:
        self.initialised = False

    def nvmlDeviceGetCount(self) -> int:
        return len(self.gpus)

    def nvmlDeviceGetHandleByIndex(self, index: int) -> FakeGpu:
        return self.gpus[index]

    def nvmlDeviceGetUUID(self, h) -> str:
        return h.uuid if isinstance(h, FakeGpu) else h[1].uuid

    def nvmlDeviceGetName(self, h) -> str:
        if isinstance(h, FakeGpu):
            return h.name
        gpu, mig = h
        return f"{gpu.name} MIG {mig.profile}"

    def nvmlDeviceGetUtilizationRates(self, h):
        self._check(h, "nvmlDeviceGetUtilizationRates")
        if not isinstance(h, FakeGpu):
            raise self._error(pynvml.NVML_ERROR_NOT_SUPPORTED)  # as on real MIG devices
        return SimpleNamespace(gpu=h.util, memory=h.util // 2)

    def nvmlDeviceGetMemoryInfo(self, h):
        self._check(h, "nvmlDeviceGetMemoryInfo")
        total, used = (h.memory_total, h.memory_used) if isinstance(h, FakeGpu) else (h[1].memory_total, h[1].memory_used)
        return SimpleNamespace(total=total, used=used, free=total - used)

    def nvmlDeviceGetPowerUsage(self, h) -> int:
        self._check(h, "nvmlDeviceGetPowerUsage")
        return h.power_mw

    def nvmlDeviceGetTotalEnergyConsumption(self, h) -> int:
        self._check(h, "nvmlDeviceGetTotalEnergyConsumption")
        return h.energy_mj

    def nvmlDeviceGetTemperature(self, h, sensor: int) -> int:
        self._check(h, "nvmlDeviceGetTemperature")
        return h.temperature

    def nvmlDeviceGetMigMode(self, h):
        self._check(h, "nvmlDeviceGetMigMode")
        on = h.migs is not None
        return (self.NVML_DEVICE_MIG_ENABLE if on else self.NVML_DEVICE_MIG_DISABLE,) * 2

    def nvmlDeviceGetMaxMigDeviceCount(self, h) -> int:
        return h.total_slices

    def nvmlDeviceGetMigDeviceHandleByIndex(self, h, index: int):
        if h.migs is None or index >= len(h.migs):
            raise self._error(pynvml.NVML_ERROR_NOT_FOUND)
        return (h, h.migs[index])

    def nvmlDeviceGetAttributes(self, h):
        gpu, mig = h
        return SimpleNamespace(gpuInstanceSliceCount=mig.slices, computeInstanceSliceCount=mig.slices,
                               memorySizeMB=mig.memory_total >> 20, multiprocessorCount=mig.slices * 16)

    def nvmlDeviceGetGpuInstanceProfileInfo(self, h, profile: int):
        sizes = [1, 2, 3, 4, 7]
        if profile >= len(sizes) or sizes[profile] > h.total_slices:
            raise self._error(pynvml.NVML_ERROR_NOT_SUPPORTED)
        return SimpleNamespace(id=profile, sliceCount=sizes[profile])

    def nvmlDeviceGetComputeRunningProcesses(self, h):
        self._check(h, "nvmlDeviceGetComputeRunningProcesses")
        procs = h.processes if isinstance(h, FakeGpu) else h[1].processes
        gi = 0 if isinstance(h, FakeGpu) else h[1].gi_id
        return [SimpleNamespace(pid=p.pid, usedGpuMemory=p.memory, gpuInstanceId=gi, computeInstanceId=0) for p in procs]

    def nvmlDeviceGetGraphicsRunningProcesses(self, h):
        return []

    def nvmlDeviceGetProcessUtilization(self, h, last_seen_us: int):
        self._check(h, "nvmlDeviceGetProcessUtilization")
        if not isinstance(h, FakeGpu) or h.migs is not None:
            raise self._error(pynvml.NVML_ERROR_NOT_SUPPORTED)
        samples = []
        for p in h.processes:
            for sm in p.sm_samples:
                self._timestamp_us += 1000
                samples.append(SimpleNamespace(pid=p.pid, timeStamp=self._timestamp_us, smUtil=sm, memUtil=sm // 2,
                                               encUtil=0, decUtil=0))
            p.sm_samples = []
        if not samples:
            raise self._error(pynvml.NVML_ERROR_NOT_FOUND)  # what NVML says when no samples are buffered
        return samples


# ---- the --simulate node ---------------------------------------------------------------------

SIM_SESSIONS = {
    41001: {"tenant_id": "acme", "team": "research", "project": "rag", "agent_id": "planner", "session_id": "sim-sess-1"},
    41002: {"tenant_id": "acme", "team": "research", "project": "rag", "agent_id": "retriever", "session_id": "sim-sess-2"},
    41003: {"tenant_id": "globex", "team": "ml", "project": "finetune", "agent_id": "trainer", "session_id": "sim-sess-3"},
    41004: {"tenant_id": "globex", "team": "ml", "project": "eval", "agent_id": "judge", "session_id": "sim-sess-4"},
}  # pid 41005 is left unattributed on purpose: unattributed GPU time must show up too


def simulated(seed: int = 7) -> FakeNvml:
    """A realistic node: two H100s (busy, idle) and one A100 split into three MIG instances."""
    gpus = [
        FakeGpu("GPU-5im0-0000-h100-busy", "NVIDIA H100 80GB HBM3", 80 * GIB, 61 * GIB, util=87, power_mw=540_000,
                energy_mj=9_000_000_000, temperature=67,
                processes=[FakeProcess(41001, 40 * GIB), FakeProcess(41002, 20 * GIB), FakeProcess(41005, 1 * GIB)]),
        FakeGpu("GPU-5im1-0000-h100-idle", "NVIDIA H100 80GB HBM3", 80 * GIB, 1 * GIB, util=0, power_mw=71_000,
                energy_mj=4_000_000_000, temperature=33),
        FakeGpu("GPU-5im2-0000-a100-mig", "NVIDIA A100-SXM4-40GB", 40 * GIB, 25 * GIB, util=0, power_mw=250_000,
                energy_mj=7_000_000_000, temperature=55, unsupported={"nvmlDeviceGetUtilizationRates"},
                migs=[FakeMig("MIG-5im2-gi1", "3g.20gb", 1, 3, 20 * GIB, 15 * GIB, [FakeProcess(41003, 14 * GIB)]),
                      FakeMig("MIG-5im2-gi2", "2g.10gb", 2, 2, 10 * GIB, 9 * GIB, [FakeProcess(41004, 8 * GIB)]),
                      FakeMig("MIG-5im2-gi3", "2g.10gb", 3, 2, 10 * GIB, 1 * GIB)]),
    ]
    return SimulatedNvml(gpus, seed)


class SimulatedNvml(FakeNvml):
    """Moves the numbers a little on every `tick(seconds)`: power drifts, energy accumulates."""

    def __init__(self, gpus: list[FakeGpu], seed: int):
        super().__init__(gpus)
        self.random = random.Random(seed)

    def tick(self, seconds: float) -> None:
        r = self.random
        for gpu in self.gpus:
            busy = gpu.util > 0 or gpu.migs is not None
            gpu.util = max(0, min(100, gpu.util + r.randint(-5, 5))) if gpu.util else 0
            gpu.power_mw = max(60_000, min(700_000, gpu.power_mw + r.randint(-20_000, 20_000) * busy))
            gpu.energy_mj += int(gpu.power_mw * seconds)  # mW × s = mJ
            gpu.temperature = max(30, min(85, gpu.temperature + r.randint(-1, 1)))
            for proc in gpu.processes:
                proc.sm_samples = [r.randint(30, 95) for _ in range(r.randint(0, 5))] if gpu.util else []
