"""`meterline collect dcgm`: DCGM exporter pages -> GpuSample rows, pods attributed, scrapes that fail.

The pages are written here after the exporter's documented format (its default counters, the labels its
renderer writes, and its Kubernetes pod mapper with and without --kubernetes-virtual-gpus)."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
from decimal import Decimal
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from collectors_kafka import read_topic
from meterline.collectors.attribution import SessionRegistry, sessions_dir
from meterline.collectors.dcgm import DcgmSource, DcgmState, PodOwners, ScrapeError, map_page
from meterline.schemas import decode
from meterline.schemas.events import GpuSample
from meterline.streams.pricing import load_catalog

REPO = Path(__file__).resolve().parents[1]
MIB = 1 << 20
H100 = 'gpu="0",UUID="GPU-1111",pci_bus_id="00000000:1A:00.0",device="nvidia0",modelName="NVIDIA H100 80GB HBM3",Hostname="gpu-node-1"'
A100 = 'gpu="1",UUID="GPU-2222",pci_bus_id="00000000:3B:00.0",device="nvidia1",modelName="NVIDIA A100-SXM4-80GB",Hostname="gpu-node-1"'
TRAINER = 'container="trainer",namespace="research",pod="trainer-7f9c6d-abcde"'


def page(*families: tuple[str, str, list[str]]) -> str:
    """(metric, type, sample lines) -> exporter text: # HELP, # TYPE, then the samples."""
    out = []
    for name, kind, lines in families:
        out += [f"# HELP {name} {name} as the exporter explains it.", f"# TYPE {name} {kind}", *lines]
    return "\n".join(out) + "\n"


# One H100 held by one pod (no sharing): the exporter labels the device's own series with the pod.
EXCLUSIVE = page(
    ("DCGM_FI_DEV_GPU_UTIL", "gauge", [f"DCGM_FI_DEV_GPU_UTIL{{{H100},{TRAINER}}} 87"]),
    ("DCGM_FI_DEV_FB_FREE", "gauge", [f"DCGM_FI_DEV_FB_FREE{{{H100},{TRAINER}}} 40000"]),
    ("DCGM_FI_DEV_FB_USED", "gauge", [f"DCGM_FI_DEV_FB_USED{{{H100},{TRAINER}}} 41000"]),
    ("DCGM_FI_DEV_FB_RESERVED", "gauge", [f"DCGM_FI_DEV_FB_RESERVED{{{H100},{TRAINER}}} 559"]),
    ("DCGM_FI_DEV_POWER_USAGE", "gauge", [f"DCGM_FI_DEV_POWER_USAGE{{{H100},{TRAINER}}} 412.5"]),
    ("DCGM_FI_DEV_GPU_TEMP", "gauge", [f"DCGM_FI_DEV_GPU_TEMP{{{H100},{TRAINER}}} 61"]),
    ("DCGM_FI_DEV_SM_CLOCK", "gauge", [f"DCGM_FI_DEV_SM_CLOCK{{{H100},{TRAINER}}} 1980"]),
    ("DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION", "counter", [f"DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION{{{H100},{TRAINER}}} 129931554972"]),
)

# Three pods time-slicing the H100 (--kubernetes-virtual-gpus): device series copied once per pod (with
# its vgpu replica); GPU_UTIL and FB_USED keep the device's own series and add each pod's own value.
PODS = [f'container="serve",namespace="inference",pod="{name}",pod_uid="uid-{i}",vgpu="{i}"'
        for i, name in enumerate(("llm-a-5d9f-x1", "llm-b-5d9f-x2", "embed-77c4-x3"))]
SLICED = page(
    ("DCGM_FI_DEV_GPU_UTIL", "gauge", [f"DCGM_FI_DEV_GPU_UTIL{{{H100}}} 90"]
     + [f"DCGM_FI_DEV_GPU_UTIL{{{H100},{p}}} {v}" for p, v in zip(PODS, (60, 30, 0))]),
    ("DCGM_FI_DEV_FB_USED", "gauge", [f"DCGM_FI_DEV_FB_USED{{{H100}}} 30000"]
     + [f"DCGM_FI_DEV_FB_USED{{{H100},{p}}} {v}" for p, v in zip(PODS, (20000, 9000, 1000))]),
    ("DCGM_FI_DEV_FB_FREE", "gauge", [f"DCGM_FI_DEV_FB_FREE{{{H100},{p}}} 51000" for p in PODS]),
    ("DCGM_FI_DEV_POWER_USAGE", "gauge", [f"DCGM_FI_DEV_POWER_USAGE{{{H100},{p}}} 350.25" for p in PODS]),
    ("DCGM_FI_PROF_GR_ENGINE_ACTIVE", "gauge", [f"DCGM_FI_PROF_GR_ENGINE_ACTIVE{{{H100},{p}}} 0.91" for p in PODS]),
)

# An A100 in MIG mode: utilization per GPU instance (GR_ENGINE_ACTIVE; GPU_UTIL has none), power and
# energy for the whole GPU; the pod on instance 1 labels that instance's series; instance 9 is free.
MIG = page(
    ("DCGM_FI_PROF_GR_ENGINE_ACTIVE", "gauge", [
        f'DCGM_FI_PROF_GR_ENGINE_ACTIVE{{{A100},GPU_I_PROFILE="3g.40gb",GPU_I_ID="1",{TRAINER}}} 0.734',
        f'DCGM_FI_PROF_GR_ENGINE_ACTIVE{{{A100},GPU_I_PROFILE="1g.10gb",GPU_I_ID="9"}} 0.000000']),
    ("DCGM_FI_DEV_FB_USED", "gauge", [
        f'DCGM_FI_DEV_FB_USED{{{A100},GPU_I_PROFILE="3g.40gb",GPU_I_ID="1",{TRAINER}}} 30000',
        f'DCGM_FI_DEV_FB_USED{{{A100},GPU_I_PROFILE="1g.10gb",GPU_I_ID="9"}} 13']),
    ("DCGM_FI_DEV_POWER_USAGE", "gauge", [f"DCGM_FI_DEV_POWER_USAGE{{{A100}}} 201.0"]),
    ("DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION", "counter", [f"DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION{{{A100}}} 5000000"]),
)

OWNERS_TOML = """
[pods."research/trainer-*"]
tenant_id = "acme"
team = "research"

[pods."inference/llm-a-5d9f-x1"]
tenant_id = "acme"
team = "serving"
agent_id = "chat"

[pods."inference/*"]
tenant_id = "globex"
"""


@pytest.fixture
def owners(tmp_path) -> PodOwners:
    path = tmp_path / "pods.toml"
    path.write_text(OWNERS_TOML)
    return PodOwners.from_file(path, SessionRegistry(sessions_dir(tmp_path)))


def levels(rows, level):
    return [r for r in rows if r.level == level]


def test_a_gpu_held_by_one_pod(owners):
    rows = map_page(EXCLUSIVE, DcgmState(interval_ms=30_000), owners, now=100.0).rows
    [gpu] = levels(rows, "gpu")
    assert (gpu.node, gpu.gpu_index, gpu.gpu_uuid, gpu.gpu_name, gpu.interval_ms) == (
        "gpu-node-1", 0, "GPU-1111", "NVIDIA H100 80GB HBM3", 30_000)
    assert (gpu.utilization_pct, gpu.memory_used_bytes, gpu.memory_total_bytes) == (87, 41000 * MIB, 81559 * MIB)
    assert (gpu.power_mw, gpu.temperature_c, gpu.energy_mj_delta) == (412_500, 61, None)
    [pod] = levels(rows, "process")
    assert (pod.namespace, pod.pod, pod.container, pod.pid, pod.device_processes) == (
        "research", "trainer-7f9c6d-abcde", "trainer", None, 1)
    assert (pod.sm_util_pct, pod.process_memory_bytes) == (87, 41000 * MIB)  # alone on it: the device's values are its own
    assert (pod.attributed, pod.tenant_id, pod.team, pod.key) == (True, "acme", "research", "acme")
    assert gpu.key == "gpu-node-1"


def test_energy_and_interval_across_scrapes_and_a_counter_reset(owners):
    state, deltas, intervals = DcgmState(interval_ms=30_000), [], []
    for energy, now in ((129931554972, 100.0), (129931557472, 115.0), (800, 125.5)):  # the third: the GPU was reset
        text = EXCLUSIVE.replace("129931554972", str(energy))
        [gpu] = levels(map_page(text, state, owners, now=now).rows, "gpu")
        deltas.append(gpu.energy_mj_delta)
        intervals.append(gpu.interval_ms)
    assert deltas == [None, 2_500, 800]
    assert intervals == [30_000, 15_000, 10_500]


def test_time_sliced_pods_each_carry_the_split_and_their_own_values(owners):
    rows = map_page(SLICED, DcgmState(), owners, now=1.0).rows
    [gpu] = levels(rows, "gpu")
    # the device's own series, not a pod's: 90 %, 30000 MiB used (+ 51000 free, read from a pod's copy)
    assert (gpu.utilization_pct, gpu.memory_used_bytes, gpu.memory_total_bytes, gpu.power_mw) == (
        90, 30000 * MIB, 81000 * MIB, 350_250)
    pods = {r.pod: r for r in levels(rows, "process")}
    assert set(pods) == {"llm-a-5d9f-x1", "llm-b-5d9f-x2", "embed-77c4-x3"}
    assert all(r.device_processes == 3 and r.namespace == "inference" for r in pods.values())
    assert [(pods[p].sm_util_pct, pods[p].process_memory_bytes // MIB) for p in ("llm-a-5d9f-x1", "llm-b-5d9f-x2", "embed-77c4-x3")] == [
        (60, 20000), (30, 9000), (0, 1000)]
    # exact key beats the namespace glob
    assert (pods["llm-a-5d9f-x1"].tenant_id, pods["llm-a-5d9f-x1"].team, pods["llm-a-5d9f-x1"].agent_id) == ("acme", "serving", "chat")
    assert pods["llm-b-5d9f-x2"].tenant_id == "globex"
    catalog = load_catalog()
    whole, share = catalog.gpu_sample_cost(gpu), catalog.gpu_sample_cost(pods["llm-b-5d9f-x2"])
    assert share[0] == Decimal("10")  # 30 s of the GPU, split three ways
    assert share[1] * 3 <= whole[1] < share[1] * 3 + Decimal("0.000000000003")


def test_copied_device_values_are_not_taken_for_one_pods_own():
    """Pods sharing a GPU with only copies of the device's series (no per-process values: an older exporter,
    or NVML had none): the GPU row gets the value, no pod is said to have used all of it."""
    copies = page(("DCGM_FI_DEV_GPU_UTIL", "gauge", [f"DCGM_FI_DEV_GPU_UTIL{{{H100},{p}}} 90" for p in PODS]),
                  ("DCGM_FI_DEV_FB_USED", "gauge", [f"DCGM_FI_DEV_FB_USED{{{H100},{p}}} 30000" for p in PODS]))
    rows = map_page(copies, DcgmState(), PodOwners(), now=1.0).rows
    [gpu] = levels(rows, "gpu")
    assert (gpu.utilization_pct, gpu.memory_used_bytes) == (90, 30000 * MIB)
    procs = levels(rows, "process")
    assert len(procs) == 3 and all(r.sm_util_pct is None and r.process_memory_bytes is None for r in procs)
    assert all(r.device_processes == 3 for r in procs)


def test_mig_instances_are_charged_by_their_slices(owners):
    rows = map_page(MIG, DcgmState(), owners, now=1.0).rows
    [gpu] = levels(rows, "gpu")
    assert (gpu.gpu_uuid, gpu.power_mw, gpu.utilization_pct) == ("GPU-2222", 201_000, None)
    migs = levels(rows, "mig")
    assert [(m.mig_uuid, m.mig_profile, m.mig_slices, m.mig_total_slices, m.utilization_pct, m.memory_used_bytes) for m in migs] == [
        ("GPU-2222/1", "3g.40gb", 3, 7, 73, 30000 * MIB), ("GPU-2222/9", "1g.10gb", 1, 7, 0, 13 * MIB)]
    [pod] = levels(rows, "process")
    assert (pod.mig_uuid, pod.mig_slices, pod.mig_total_slices, pod.device_processes, pod.sm_util_pct) == ("GPU-2222/1", 3, 7, 1, 73)
    assert pod.tenant_id == "acme"
    seconds, _ = load_catalog().gpu_sample_cost(pod)
    assert seconds == Decimal("12.857142857143")  # 30 s × 3/7
    a30 = MIG.replace("NVIDIA A100-SXM4-80GB", "NVIDIA A30").replace("3g.40gb", "2g.12gb").replace("1g.10gb", "1g.6gb")
    assert [(m.mig_slices, m.mig_total_slices) for m in levels(map_page(a30, DcgmState(), owners, now=1.0).rows, "mig")] == [(2, 4), (1, 4)]


def test_unknown_pods_are_published_unattributed_with_the_pod_recorded():
    [pod] = levels(map_page(EXCLUSIVE, DcgmState(), PodOwners(), now=1.0).rows, "process")
    assert (pod.attributed, pod.tenant_id, pod.session_id, pod.key) == (False, "", "", "unattributed")
    assert (pod.namespace, pod.pod, pod.container) == ("research", "trainer-7f9c6d-abcde", "trainer")


def test_an_sdk_session_that_names_its_pod_wins_over_the_file(owners, tmp_path, monkeypatch):
    monkeypatch.setenv("METERLINE_POD_NAME", "trainer-7f9c6d-abcde")
    monkeypatch.setenv("METERLINE_POD_NAMESPACE", "research")
    SessionRegistry(sessions_dir(tmp_path)).register(os.getpid(), {"tenant_id": "acme", "agent_id": "planner", "session_id": "s-42"})
    [pod] = levels(map_page(EXCLUSIVE, DcgmState(), owners, now=1.0).rows, "process")
    # the session from the registration, the team (which it left blank) from the file
    assert (pod.attributed, pod.tenant_id, pod.team, pod.agent_id, pod.session_id) == (True, "acme", "research", "planner", "s-42")


def test_a_pods_file_that_is_not_one_is_refused(tmp_path):
    bad = tmp_path / "pods.json"
    for text, reason in (('{"pods": {"trainer": {"tenant_id": "acme"}}}', "<namespace>/<pod>"),
                         ('{"pods": {"a/b": {"tenant": "acme"}}}', "may set only"), ("{", "cannot read")):
        bad.write_text(text)
        with pytest.raises(ValueError, match=reason):
            PodOwners.from_file(bad)


def test_malformed_series_are_skipped_and_counted_blanks_are_none():
    text = page(
        ("DCGM_FI_DEV_GPU_UTIL", "gauge", [
            f"DCGM_FI_DEV_GPU_UTIL{{{H100}}} 150",  # out of range
            'DCGM_FI_DEV_GPU_UTIL{gpu="0",device="nvidia0"} 10',  # no UUID
            'DCGM_FI_DEV_GPU_UTIL{gpu="zero",UUID="GPU-1111"} 10',  # not an index
            f"DCGM_FI_DEV_GPU_UTIL{{{A100}}} NaN"]),
        ("DCGM_FI_PROF_GR_ENGINE_ACTIVE", "gauge", [
            f'DCGM_FI_PROF_GR_ENGINE_ACTIVE{{{A100},GPU_I_PROFILE="huge",GPU_I_ID="3"}} 0.5']),  # not a MIG profile
        ("DCGM_FI_DEV_FB_USED", "gauge", [f"DCGM_FI_DEV_FB_USED{{{H100}}} 100", f"DCGM_FI_DEV_FB_USED{{{A100}}} 200"]),
        ("DCGM_FI_DEV_GPU_TEMP", "gauge", [f"DCGM_FI_DEV_GPU_TEMP{{{H100}}} 9223372036854775794"]),  # DCGM's blank
    )
    scrape = map_page(text, DcgmState(), PodOwners(), now=1.0)
    assert (scrape.series, scrape.skipped) == (8, 5)
    gpus = {r.gpu_uuid: r for r in levels(scrape.rows, "gpu")}
    assert (gpus["GPU-1111"].utilization_pct, gpus["GPU-1111"].memory_used_bytes, gpus["GPU-1111"].temperature_c) == (None, 100 * MIB, None)
    assert gpus["GPU-2222"].memory_used_bytes == 200 * MIB and not levels(scrape.rows, "mig")


def test_a_page_that_is_not_an_exporters_is_a_scrape_error_and_leaves_the_state():
    state = DcgmState()
    for text in ("<html><body>502 Bad Gateway</body></html>", "# TYPE up gauge\nup 1\n", ""):
        with pytest.raises(ScrapeError):
            map_page(text, state, PodOwners(), now=1.0)
    assert state.last_clock is None


# ---- over HTTP --------------------------------------------------------------------------------


class Exporter:
    """A local HTTP server answering /metrics with `pages` in turn (an int: that status), then the last forever."""

    def __init__(self, *pages: str | int):
        self.pages, self.hits = list(pages), 0
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802
                answer = outer.pages[min(outer.hits, len(outer.pages) - 1)]
                outer.hits += 1
                body = (answer if isinstance(answer, str) else "unavailable").encode()
                self.send_response(200 if isinstance(answer, str) else answer)
                self.send_header("Content-Type", "text/plain; version=0.0.4")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/metrics"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def exporter():
    servers = []

    def start(*pages):
        servers.append(Exporter(*pages))
        return servers[-1]

    yield start
    for server in servers:
        server.close()


def _env(tmp_path, **extra):
    return {**os.environ, "METERLINE_DATA_DIR": str(tmp_path / "data"), **extra}


def test_the_source_retries_after_a_failed_scrape(exporter):
    server = exporter(503, EXCLUSIVE)
    source = DcgmSource(server.url, PodOwners(), interval_s=30)
    with pytest.raises(ScrapeError, match="503"):
        source.sample()
    assert len(levels(source.sample().rows, "process")) == 1
    server.close()
    with pytest.raises(ScrapeError, match="cannot reach"):
        source.sample()


def test_collect_dcgm_once_prints_the_samples(exporter, tmp_path):
    server = exporter(MIG)
    (tmp_path / "pods.toml").write_text(OWNERS_TOML)
    out = subprocess.run([str(REPO / ".venv" / "bin" / "meterline"), "collect", "dcgm", "--url", server.url, "--once", "--json",
                          "--no-publish", "--pods-file", str(tmp_path / "pods.toml")],
                         env=_env(tmp_path), capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    rows = [GpuSample.model_validate_json(line) for line in out.stdout.splitlines()]
    assert [r.level for r in rows] == ["gpu", "mig", "process", "mig"]
    assert rows[2].pod == "trainer-7f9c6d-abcde" and rows[2].tenant_id == "acme" and rows[2].mig_slices == 3


def test_collect_dcgm_warns_and_retries_never_crashes(exporter, tmp_path):
    server = exporter(500, "<html>not metrics</html>", EXCLUSIVE)
    proc = subprocess.Popen([str(REPO / ".venv" / "bin" / "meterline"), "collect", "dcgm", "--url", server.url, "--interval", "0.2",
                             "--json", "--no-publish"], env=_env(tmp_path, COLUMNS="200"), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        first = proc.stdout.readline()  # blocks until a scrape succeeded
        assert json.loads(first)["level"] == "gpu"
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
    assert proc.returncode == 0
    warnings = [line for line in err.splitlines() if line.strip()]
    assert len(warnings) == 2 and all(line.startswith("DCGM scrape failed") for line in warnings), err
    assert "500" in warnings[0] and "not a Prometheus text page" in warnings[1]

    down = subprocess.run([str(REPO / ".venv" / "bin" / "meterline"), "collect", "dcgm", "--url", "http://127.0.0.1:9/metrics",
                           "--once", "--no-publish", "--timeout", "2"], env=_env(tmp_path), capture_output=True, text=True, timeout=60)
    assert down.returncode == 1 and "Traceback" not in down.stderr
    assert down.stderr.strip().startswith("DCGM scrape failed: cannot reach") and len(down.stderr.strip().splitlines()) == 1


def test_collect_dcgm_publishes_to_the_gpu_topic(exporter, settings, tmp_path):
    server = exporter(SLICED)
    env = {**os.environ, "METERLINE_KAFKA_BOOTSTRAP": settings.bootstrap, "METERLINE_TOPIC_PREFIX": settings.topic_prefix,
           "METERLINE_DATA_DIR": str(settings.data_dir)}
    (tmp_path / "pods.toml").write_text(OWNERS_TOML)
    out = subprocess.run([str(REPO / ".venv" / "bin" / "meterline"), "collect", "dcgm", "--url", server.url, "--once", "--json",
                          "--pods-file", str(tmp_path / "pods.toml")], env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    printed = [json.loads(line) for line in out.stdout.splitlines()]
    messages = read_topic(settings, settings.topic("gpu"), len(printed))
    rows = [decode(GpuSample, m.value()) for m in messages]
    assert sorted(str(r.sample_id) for r in rows) == sorted(p["sample_id"] for p in printed)
    # the GPU row by node, each pod's row by the tenant it charges
    assert sorted((m.key(), r.level, r.pod) for m, r in zip(messages, rows)) == [
        (b"acme", "process", "llm-a-5d9f-x1"), (b"globex", "process", "embed-77c4-x3"),
        (b"globex", "process", "llm-b-5d9f-x2"), (b"gpu-node-1", "gpu", "")]
