"""The node collector (collectors/node.py): pure parsers on fixtures, cgroup mode on a fixture tree, and
process mode on this machine's real processes."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from decimal import Decimal
from pathlib import Path

import pytest

from meterline.collectors.attribution import Attributor, SessionRegistry
from meterline.collectors.node import (
    Container, NodeCollector, cgroup_v2_path, container_of, parse_cpu_stat, parse_stat, parse_status, pods_from_log_dirs,
)
from meterline.schemas.events import ComputeSample, decode

CID = "4f1c2b9e0d7a6c5b3e8f1a2d4c6b8e0f1a3c5e7d9b2f4a6c8e0d2b4f6a8c0e2d"
UID = "3b2a1c0d-9e8f-4a7b-8c6d-5e4f3a2b1c0d"


def test_stat_fields_survive_a_command_name_with_spaces_and_parentheses():
    text = "4242 (my (odd) proc) S 17 4242 4242 0 -1 4194304 500 0 0 0 1234 56 0 0 20 0 3 0 987654 1000 200 " + "0 " * 30
    stat = parse_stat(text)
    assert (stat.ppid, stat.utime, stat.stime, stat.starttime) == (17, 1234, 56, 987654)


def test_status_gives_rss_and_high_water_mark_in_bytes_and_none_for_a_kernel_thread():
    assert parse_status("Name:\tpython\nVmHWM:\t  204800 kB\nVmRSS:\t  102400 kB\nThreads:\t1\n") == (102400 * 1024, 204800 * 1024)
    assert parse_status("Name:\tkworker/0:1\nState:\tI (idle)\nThreads:\t1\n") is None


def test_cpu_stat_and_the_unified_line_of_proc_cgroup():
    assert parse_cpu_stat("usage_usec 1500000\nuser_usec 1000000\nsystem_usec 500000\nnr_periods 0\n") == (1_000_000, 500_000)
    assert cgroup_v2_path("12:memory:/x\n0::/system.slice/app.service\n") == "/system.slice/app.service"
    assert cgroup_v2_path("4:memory:/x\n1:cpu:/\n") == ""  # v1 only


@pytest.mark.parametrize("path, expected", [
    # systemd cgroup driver: containerd and CRI-O, burstable and guaranteed pods (the UID's dashes are underscores)
    (f"/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{UID.replace('-', '_')}.slice/cri-containerd-{CID}.scope",
     Container("containerd", CID, UID)),
    (f"/kubepods.slice/kubepods-pod{UID.replace('-', '_')}.slice/crio-{CID}.scope", Container("cri-o", CID, UID)),
    (f"/kubepods.slice/kubepods-pod{UID.replace('-', '_')}.slice/crio-conmon-{CID}.scope", Container("", "", UID)),
    # cgroupfs driver: the bare id (runtime unknown) and CRI-O's prefixed one
    (f"/kubepods/besteffort/pod{UID}/{CID}", Container("", CID, UID)),
    (f"/kubepods/pod{UID}/crio-{CID}", Container("cri-o", CID, UID)),
    # no Kubernetes: Docker under systemd or cgroupfs, Podman
    (f"/system.slice/docker-{CID}.scope", Container("docker", CID, "")),
    (f"/docker/{CID}", Container("docker", CID, "")),
    (f"/user.slice/user-1000.slice/user@1000.service/user.slice/libpod-{CID}.scope", Container("podman", CID, "")),
    ("/system.slice/sshd.service", Container()),
])
def test_the_cgroup_path_names_the_container_and_the_pod(path, expected):
    assert container_of(path) == expected


def test_pod_uids_resolve_from_the_kubelet_log_directory_names():
    assert pods_from_log_dirs([f"agents_planner-7d9f_{UID}", "not-a-pod", "a_b"]) == {UID: ("agents", "planner-7d9f")}


# ---- cgroup mode on a fixture tree ---------------------------------------------------------

def _group(root: Path, path: str, pids: list[int], user_usec: int, system_usec: int, current: int, peak: int | None) -> Path:
    group = root / path.strip("/")
    group.mkdir(parents=True, exist_ok=True)
    (group / "cgroup.procs").write_text("".join(f"{p}\n" for p in pids))
    (group / "cpu.stat").write_text(f"usage_usec {user_usec + system_usec}\nuser_usec {user_usec}\nsystem_usec {system_usec}\n")
    (group / "memory.current").write_text(f"{current}\n")
    if peak is not None:
        (group / "memory.peak").write_text(f"{peak}\n")
    return group


def test_cgroup_mode_charges_cpu_deltas_memory_and_attributes_a_pod_by_its_registered_session(tmp_path):
    root, proc, pods, runs = tmp_path / "cg", tmp_path / "proc", tmp_path / "pods", tmp_path / "run"
    proc.mkdir()
    (pods / f"agents_planner_{UID}").mkdir(parents=True)
    container = f"kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{UID.replace('-', '_')}.slice/cri-containerd-{CID}.scope"
    _group(root, "", [1], 90_000_000, 9_000_000, 1, None)  # the root counts the whole machine: not a row
    _group(root, "kubepods.slice", [], 9_000_000, 9_000_000, 1, None)  # an inner node: not a row
    _group(root, container, [9001], 1_000_000, 200_000, 512 << 20, 600 << 20)
    (root / container / "cpu.max").write_text("150000 100000\n")  # a 1.5-core limit
    (root / "system.slice/cron.service").mkdir(parents=True)
    (root / "system.slice/cron.service" / "cpu.max").write_text("max 100000\n")  # no limit
    _group(root, "system.slice/cron.service", [9002], 10, 10, 4 << 20, None)  # nobody's: kept, attributed=false
    runs.mkdir()
    (runs / "77.json").write_text(json.dumps({"pid": 77, "start_time": None, "tenant_id": "acme", "team": "ml",
                                              "session_id": "s-pod", "namespace": "agents", "pod": "planner"}))
    clock = iter([0.0, 10.0, 20.0])
    collector = NodeCollector(Attributor(SessionRegistry(runs, proc)), node="n1", node_class="general", level="cgroup",
                              cgroup_root=root, proc=proc, pods_dir=pods, clock=lambda: next(clock))
    assert collector.sample() == []  # the baseline
    _group(root, container, [9001], 3_500_000, 700_000, 256 << 20, 600 << 20)
    rows = {r.cgroup: r for r in collector.sample()}
    assert set(rows) == {"/" + container, "/system.slice/cron.service"}
    pod = rows["/" + container]
    assert (pod.runtime, pod.container_id, pod.pod_uid, pod.namespace, pod.pod) == ("containerd", CID, UID, "agents", "planner")
    assert (pod.cpu_user_seconds, pod.cpu_system_seconds, pod.cpu_seconds) == (Decimal("2.5"), Decimal("0.5"), Decimal(3))
    assert (pod.memory_bytes, pod.memory_peak_bytes, pod.memory_byte_seconds) == (256 << 20, 600 << 20, Decimal(256 << 20) * 10)
    assert (pod.attributed, pod.tenant_id, pod.team, pod.session_id, pod.interval_ms, pod.node_class) == (True, "acme", "ml", "s-pod", 10_000, "general")
    assert pod.cpu_limit_cores == Decimal("1.5") and rows["/system.slice/cron.service"].cpu_limit_cores is None
    cron = rows["/system.slice/cron.service"]
    assert (cron.attributed, cron.tenant_id, cron.cpu_seconds, cron.memory_peak_bytes, cron.key) == (False, "", 0, 4 << 20, "unattributed")
    assert decode(ComputeSample, pod.to_json()) == pod  # the record survives the wire


# ---- process mode on this machine's real processes -------------------------------------------

CHILD = r"""
import os, sys
block = bytearray(int(sys.argv[1]))
for i in range(0, len(block), 4096):
    block[i] = 1  # touch every page: resident
n = 0
while sum(os.times()[:2]) < float(sys.argv[2]):
    n += 1
t = os.times()
print(t[0] + t[1], flush=True)
sys.stdin.read()  # hold the memory, use no CPU, until the test is done
"""
ALLOC = 192 << 20
BURN_S = 0.6


def _spawn(env: dict[str, str]) -> tuple[subprocess.Popen, float]:
    child = subprocess.Popen([sys.executable, "-c", CHILD, str(ALLOC), str(BURN_S)], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, text=True, env=env)
    return child, float(child.stdout.readline())


def test_real_processes_are_sampled_with_their_cpu_time_memory_and_session(tmp_path):
    base = {k: v for k, v in os.environ.items() if not k.startswith("METERLINE_")}
    collector = NodeCollector(Attributor(SessionRegistry(tmp_path / "sessions")), node="here")
    collector.sample()  # baseline: before either child exists
    owned, owned_cpu = _spawn({**base, "METERLINE_TENANT_ID": "acme", "METERLINE_TEAM": "research",
                               "METERLINE_SESSION_ID": "s-node-1", "METERLINE_AGENT_ID": "burner"})
    stranger, stranger_cpu = _spawn(base)
    try:
        rows = {r.pid: r for r in collector.sample()}
    finally:
        for child in (owned, stranger):
            child.stdin.close()
            child.wait(30)
    mine, other = rows[owned.pid], rows[stranger.pid]
    for row, cpu in ((mine, owned_cpu), (other, stranger_cpu)):
        assert cpu >= BURN_S
        assert abs(row.cpu_seconds - Decimal(str(cpu))) <= Decimal("0.03")  # what the child measured, to 3 clock ticks
        assert ALLOC <= row.memory_bytes <= ALLOC + (96 << 20) and row.memory_peak_bytes >= row.memory_bytes
        assert row.memory_byte_seconds == Decimal(row.memory_bytes) * row.interval_ms / 1000
    assert (mine.attributed, mine.tenant_id, mine.team, mine.agent_id, mine.session_id) == (True, "acme", "research", "burner", "s-node-1")
    assert (other.attributed, other.tenant_id, other.session_id) == (False, "", "")  # unknown owner: kept, not dropped


def test_the_sdk_registry_wins_over_the_environment_for_a_child_of_a_registered_agent(tmp_path):
    registry = SessionRegistry(tmp_path / "sessions")
    registry.register(os.getpid(), {"tenant_id": "umbrella", "session_id": "s-registered"})
    collector = NodeCollector(Attributor(registry), node="here")
    collector.sample()
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("METERLINE_")}, "METERLINE_TENANT_ID": "acme",
           "METERLINE_SESSION_ID": "s-env"}
    child, _ = _spawn(env)
    try:
        row = next(r for r in collector.sample() if r.pid == child.pid)
    finally:
        child.stdin.close()
        child.wait(30)
    assert (row.tenant_id, row.session_id, row.attributed) == ("umbrella", "s-registered", True)


PARENT = r"""
import subprocess, sys
child = subprocess.Popen([sys.executable, "-c", "import sys; print(flush=True); sys.stdin.read()"], stdin=subprocess.PIPE,
                         stdout=subprocess.PIPE, text=True)
child.stdout.readline()
print(child.pid, flush=True)
sys.stdin.read()
child.stdin.close()
child.wait()
"""


def test_pid_roots_keep_only_that_process_tree(tmp_path):
    """`collect node --pid`: a process and its descendants, nothing else of the machine (the demo's tool workers)."""
    parent = subprocess.Popen([sys.executable, "-c", PARENT], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    stranger, _ = _spawn({k: v for k, v in os.environ.items() if not k.startswith("METERLINE_")})
    try:
        grandchild = int(parent.stdout.readline())
        collector = NodeCollector(Attributor(SessionRegistry(tmp_path / "sessions")), node="here", roots={parent.pid})
        collector.sample()
        pids = {r.pid for r in collector.sample()}
        everything = NodeCollector(Attributor(SessionRegistry(tmp_path / "sessions")), node="here")
        everything.sample()
        all_pids = {r.pid for r in everything.sample()}
    finally:
        for proc in (parent, stranger):
            proc.stdin.close()
            proc.wait(30)
    assert pids == {parent.pid, grandchild}  # the tree, found by ppid, and no other process
    assert {parent.pid, grandchild, stranger.pid, os.getpid()} <= all_pids  # without roots: the whole machine


# ---- Kubernetes pod list: names and meterline.io/ labels, from a local API server stand-in -------------

def _pod_list(*pods: tuple[str, str, str, dict]) -> dict:
    """A PodList as the API server writes it (kind, apiVersion, metadata, items with metadata and spec)."""
    return {"kind": "PodList", "apiVersion": "v1", "metadata": {"resourceVersion": "42"},
            "items": [{"metadata": {"uid": uid, "namespace": ns, "name": name, "labels": labels},
                       "spec": {"nodeName": "n1"}, "status": {"phase": "Running"}} for uid, ns, name, labels in pods]}


class KubeApi:
    """Serves /api/v1/pods and /api/v1/namespaces to a bearer token only (401 otherwise), or 503 when down."""

    def __init__(self, pods: dict, namespaces: dict, token: str) -> None:
        import threading
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        api = self
        self.pods, self.namespaces, self.token, self.down, self.paths = pods, namespaces, token, False, []

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):
                api.paths.append(self.path)
                doc = api.pods if self.path.startswith("/api/v1/pods") else api.namespaces
                status = 503 if api.down else 401 if self.headers.get("Authorization") != f"Bearer {api.token}" else 200
                body = json.dumps(doc if status == 200 else {"kind": "Status", "code": status}).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_port}"


def test_pods_and_namespaces_labelled_meterline_io_tenant_own_the_rows_no_session_claims(tmp_path):
    from meterline.collectors.kube import PodDirectory

    labelled, in_team_ns, unlabelled = UID, "5c4b3a2d-1e0f-4a9b-8c7d-6e5f4a3b2c1d", "7e6d5c4b-3a2f-4e1d-9c8b-7a6f5e4d3c2b"
    api = KubeApi(_pod_list((labelled, "agents", "planner", {"meterline.io/tenant": "acme", "meterline.io/agent": "planner"}),
                            (in_team_ns, "research", "notebook", {"app": "jupyter"}),
                            (unlabelled, "default", "web", {})),
                  {"kind": "NamespaceList", "items": [{"metadata": {"name": "research", "labels": {
                      "meterline.io/tenant": "globex", "meterline.io/team": "ml"}}}, {"metadata": {"name": "default"}}]},
                  token="s3cret")
    try:
        token = tmp_path / "token"
        token.write_text("s3cret\n")
        root, proc, runs = tmp_path / "cg", tmp_path / "proc", tmp_path / "run"
        proc.mkdir(), runs.mkdir()
        paths = {uid: f"kubepods.slice/kubepods-pod{uid.replace('-', '_')}.slice/cri-containerd-{CID}.scope"
                 for uid in (labelled, in_team_ns, unlabelled)}
        for i, path in enumerate(paths.values()):
            _group(root, path, [9100 + i], 0, 0, 1 << 20, None)
        ticks = iter([0.0, 10.0, 20.0, 100.0, 200.0])
        directory = PodDirectory(f"{api.url}/api/v1/pods?fieldSelector=spec.nodeName=n1", f"{api.url}/api/v1/namespaces",
                                 token_file=token, refresh_s=60, clock=lambda: next(ticks))
        collector = NodeCollector(Attributor(SessionRegistry(runs, proc)), node="n1", level="cgroup", cgroup_root=root,
                                  proc=proc, pods_dir=tmp_path / "no-pod-logs", directory=directory)
        collector.sample()
        rows = {r.pod_uid: r for r in collector.sample()}
        owner = {uid: (r.namespace, r.pod, r.attributed, r.tenant_id, r.team, r.agent_id) for uid, r in rows.items()}
        assert owner == {labelled: ("agents", "planner", True, "acme", "", "planner"),      # the pod's own label
                         in_team_ns: ("research", "notebook", True, "globex", "ml", ""),   # its namespace's
                         unlabelled: ("default", "web", False, "", "", "")}                # nobody's: kept
        assert api.paths == ["/api/v1/pods?fieldSelector=spec.nodeName=n1", "/api/v1/namespaces"]  # read once a minute
        api.down = True  # the API server goes away: the last lists stay, the collector goes on
        collector.sample()
        assert {r.pod_uid: r.tenant_id for r in collector.sample()}[labelled] == "acme"
        api.down, api.token = False, "rotated"
        api.pods = _pod_list((labelled, "agents", "planner", {"meterline.io/tenant": "initech"}))
        token.write_text("rotated\n")  # a projected token rotates: the file is read for every request
        directory.refresh()
        assert directory.owner(labelled) == {"tenant_id": "initech"} and directory.pod(in_team_ns) is None
    finally:
        api.server.shutdown()


def test_an_answer_that_is_not_a_pod_list_names_no_pod():
    from meterline.collectors.kube import labels_from_namespaces, owner_from_labels, pods_from_list

    for doc in (None, [], {"items": None}, {"items": [1, "x", {"metadata": "m"}, {"metadata": {"uid": "u"}}]}):
        assert pods_from_list(doc) == {} and labels_from_namespaces(doc) == {}
    assert owner_from_labels({"meterline.io/team": "ml"}, {}) == {}  # a team without a tenant names nobody
