"""The NVML collector against a fake pynvml (no GPU here), attribution through /proc and the run directory, and the CLI."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from decimal import Decimal
from pathlib import Path

import pytest
from typer.testing import CliRunner

from collectors_kafka import read_topic
from meterline.collectors.attribution import Attributor, SessionRegistry, sessions_dir
from meterline.collectors.gpu import GpuCollector, NvmlUnavailable
from meterline.collectors.nvml_fake import GIB, FakeGpu, FakeMig, FakeNvml, FakeProcess
from meterline.schemas import decode
from meterline.schemas.events import GpuSample
from meterline.streams.pricing import load_catalog

REPO = Path(__file__).resolve().parents[1]
NOBODY = 4_000_000  # above pid_max: no such process


class Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def _collector(gpus, tmp_path, static=None, clock=None):
    attributor = Attributor(SessionRegistry(sessions_dir(tmp_path)), static)
    return GpuCollector(FakeNvml(gpus), attributor, node="node-1", interval_s=5, clock=clock or Clock())


def _by_level(rows, level):
    return [r for r in rows if r.level == level]


def test_gpu_metrics_and_unsupported_calls_become_none(tmp_path):
    gpu = FakeGpu("GPU-a", "NVIDIA L4", 24 * GIB, 6 * GIB, util=42, power_mw=61_000, temperature=51,
                  unsupported={"nvmlDeviceGetPowerUsage", "nvmlDeviceGetTotalEnergyConsumption", "nvmlDeviceGetMigMode"})
    [row] = _collector([gpu], tmp_path).sample()
    assert (row.level, row.gpu_uuid, row.gpu_name, row.node, row.interval_ms) == ("gpu", "GPU-a", "NVIDIA L4", "node-1", 5000)
    assert (row.utilization_pct, row.memory_used_bytes, row.memory_total_bytes, row.temperature_c) == (42, 6 * GIB, 24 * GIB, 51)
    assert (row.power_mw, row.energy_mj_delta, row.simulated) == (None, None, False)


def test_energy_delta_needs_a_baseline_and_survives_a_counter_reset(tmp_path):
    gpu, clock = FakeGpu("GPU-e", "H100", 80 * GIB, energy_mj=1_000_000), Clock()
    collector = _collector([gpu], tmp_path, clock=clock)
    deltas, intervals = [], []
    for energy, seconds in ((1_000_000, 0), (1_002_500, 5), (400, 4)):  # the third: driver reload reset the counter
        gpu.energy_mj, clock.now = energy, clock.now + seconds
        [row] = collector.sample()
        deltas.append(row.energy_mj_delta)
        intervals.append(row.interval_ms)
    assert deltas == [None, 2_500, 400]
    assert intervals == [5000, 5000, 4000]


def test_mig_instances_and_their_processes(tmp_path):
    gpu = FakeGpu("GPU-m", "NVIDIA A100-SXM4-40GB", 40 * GIB, 20 * GIB, unsupported={"nvmlDeviceGetUtilizationRates"},
                  migs=[FakeMig("MIG-1", "3g.20gb", 1, 3, 20 * GIB, 15 * GIB, [FakeProcess(NOBODY, 14 * GIB)]),
                        FakeMig("MIG-2", "1g.5gb", 2, 1, 5 * GIB, 0)])
    rows = _collector([gpu], tmp_path).sample()
    [whole] = _by_level(rows, "gpu")
    assert whole.utilization_pct is None
    migs = _by_level(rows, "mig")
    assert [(m.mig_uuid, m.mig_profile, m.mig_slices, m.mig_total_slices, m.memory_used_bytes) for m in migs] == [
        ("MIG-1", "3g.20gb", 3, 7, 15 * GIB), ("MIG-2", "1g.5gb", 1, 7, 0)]
    [proc] = _by_level(rows, "process")
    assert (proc.pid, proc.mig_uuid, proc.mig_slices, proc.process_memory_bytes) == (NOBODY, "MIG-1", 3, 14 * GIB)
    assert proc.sm_util_pct is None  # NVML has no per-process utilization on MIG devices
    assert proc.attributed is False and proc.tenant_id == ""  # unknown owner: reported, not dropped


def test_processes_sharing_a_device_each_carry_the_split(tmp_path):
    """Each process row says how many processes share its device, so a process row can be keyed by its
    tenant (away from its siblings) and still be charged exactly its share."""
    gpu = FakeGpu("GPU-s", "NVIDIA A100-SXM4-40GB", 40 * GIB, 20 * GIB,
                  migs=[FakeMig("MIG-1", "3g.20gb", 1, 3, 20 * GIB, 15 * GIB, [FakeProcess(NOBODY, GIB), FakeProcess(NOBODY + 1, GIB)]),
                        FakeMig("MIG-2", "1g.5gb", 2, 1, 5 * GIB, GIB, [FakeProcess(NOBODY + 2, GIB)])])
    procs = {r.pid: r for r in _by_level(_collector([gpu], tmp_path).sample(), "process")}
    assert {pid: r.device_processes for pid, r in procs.items()} == {NOBODY: 2, NOBODY + 1: 2, NOBODY + 2: 1}
    catalog = load_catalog()
    shared, alone = catalog.gpu_sample_cost(procs[NOBODY]), catalog.gpu_sample_cost(procs[NOBODY + 2])
    whole_slice = catalog.gpu_sample_cost(procs[NOBODY].model_copy(update={"device_processes": 1}))
    assert shared[1] * 2 <= whole_slice[1] < shared[1] * 2 + Decimal("0.000000000002")  # rounded down, never over
    # 5 s of 1/7 GPU alone; 5 s of 3/7 GPU (2.142857142857 s) split in two, rounded down
    assert (alone[0], shared[0]) == (Decimal("0.714285714286"), Decimal("1.071428571428"))


def test_process_sm_utilization_with_and_without_samples(tmp_path):
    busy, idle = FakeProcess(NOBODY, 2 * GIB, sm_samples=[40, 60]), FakeProcess(NOBODY + 1, None)
    gpu = FakeGpu("GPU-p", "H100", 80 * GIB, processes=[busy, idle])
    collector = _collector([gpu], tmp_path)
    first = {r.pid: r for r in _by_level(collector.sample(), "process")}
    assert (first[NOBODY].sm_util_pct, first[NOBODY + 1].sm_util_pct) == (50, 0)
    assert first[NOBODY + 1].process_memory_bytes is None
    second = {r.pid: r for r in _by_level(collector.sample(), "process")}  # NVML has no new samples at all
    assert (second[NOBODY].sm_util_pct, second[NOBODY + 1].sm_util_pct) == (0, 0)


@pytest.fixture
def child():
    """A real process to attribute (it waits on stdin until the test ends)."""
    procs = []

    def spawn(env=None):
        proc = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"], stdin=subprocess.PIPE,
                                env={**os.environ, **(env or {})})
        procs.append(proc)
        environ = Path(f"/proc/{proc.pid}/environ")
        deadline = time.monotonic() + 30  # until the child runs with its environment (exec done, not exited)
        while b"PATH=" not in environ.read_bytes() and time.monotonic() < deadline:
            assert proc.poll() is None, f"the child exited with {proc.returncode}"
            time.sleep(0.01)
        return proc.pid

    yield spawn
    for proc in procs:
        proc.stdin.close()
        proc.wait()


def test_attribution_run_directory_wins_over_the_environment(tmp_path, child):
    pid = child({"METERLINE_TENANT_ID": "env-tenant", "METERLINE_SESSION_ID": "env-session"})
    gpu = FakeGpu("GPU-x", "H100", 80 * GIB, processes=[FakeProcess(pid, GIB)])
    [proc] = _by_level(_collector([gpu], tmp_path).sample(), "process")
    assert (proc.attributed, proc.tenant_id, proc.session_id) == (True, "env-tenant", "env-session")

    SessionRegistry(sessions_dir(tmp_path)).register(pid, {"tenant_id": "acme", "agent_id": "planner", "session_id": "s-9"})
    [proc] = _by_level(_collector([gpu], tmp_path).sample(), "process")
    assert (proc.tenant_id, proc.agent_id, proc.session_id) == ("acme", "planner", "s-9")


def test_a_gpu_worker_inherits_the_session_of_the_agent_that_spawned_it(tmp_path, child):
    SessionRegistry(sessions_dir(tmp_path)).register(os.getpid(), {"tenant_id": "acme", "session_id": "parent-session"})
    pid = child()
    gpu = FakeGpu("GPU-x", "H100", 80 * GIB, processes=[FakeProcess(pid, GIB)])
    [proc] = _by_level(_collector([gpu], tmp_path).sample(), "process")
    assert (proc.attributed, proc.session_id) == (True, "parent-session")


def test_a_stale_registration_of_a_recycled_pid_is_ignored(tmp_path, child):
    pid = child()
    registry = SessionRegistry(sessions_dir(tmp_path))
    registry.register(pid, {"tenant_id": "acme", "session_id": "old"})
    path = sessions_dir(tmp_path) / f"{pid}.json"
    record = json.loads(path.read_text())
    path.write_text(json.dumps({**record, "start_time": record["start_time"] - 1}))  # written by an earlier owner of the pid
    assert registry.lookup(pid) is None


def test_simulate_publishes_marked_samples_to_kafka(settings):
    env = {**os.environ, "METERLINE_KAFKA_BOOTSTRAP": settings.bootstrap, "METERLINE_TOPIC_PREFIX": settings.topic_prefix,
           "METERLINE_DATA_DIR": str(settings.data_dir)}
    out = subprocess.run([str(REPO / ".venv" / "bin" / "meterline"), "collect", "gpu", "--simulate", "--once", "--json",
                          "--node", "sim-node"], env=env, capture_output=True, text=True, check=True)
    printed = [json.loads(line) for line in out.stdout.splitlines()]
    messages = read_topic(settings, settings.topic("gpu"), len(printed))
    rows = [decode(GpuSample, m.value()) for m in messages]
    assert len(rows) == len(printed)
    # device rows by node; process rows by the tenant they charge (co-partitioned with its usage events)
    assert all(m.key() == (b"sim-node" if r.level != "process" else (r.tenant_id or "unattributed").encode())
               for m, r in zip(messages, rows))
    assert all(r.simulated for r in rows)
    assert {r.level for r in rows} == {"gpu", "mig", "process"}
    procs = _by_level(rows, "process")
    assert any(r.attributed and r.session_id for r in procs) and any(not r.attributed for r in procs)
    assert any(r.mig_total_slices == 7 for r in _by_level(rows, "mig"))


def test_without_nvml_the_command_fails_with_one_clear_line(monkeypatch, tmp_path):
    from meterline.cli import app
    from meterline.collectors import gpu
    from meterline.settings import get_settings

    def no_driver():
        raise NvmlUnavailable("NVML Shared Library Not Found")

    monkeypatch.setattr(gpu, "load_nvml", no_driver)
    monkeypatch.setenv("METERLINE_DATA_DIR", str(tmp_path))
    get_settings.cache_clear()
    result = CliRunner().invoke(app, ["collect", "gpu", "--once", "--no-publish"])
    get_settings.cache_clear()
    assert result.exit_code != 0
    assert "no NVML" in result.output and "--simulate" in result.output
