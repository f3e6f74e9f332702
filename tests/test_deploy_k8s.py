"""deploy/k8s/node-collector.yaml grants the node collector exactly what it needs, parsed with PyYAML.

What it needs: read pods (get/list/watch) and list namespaces (their labels), nothing else, no other API group; the node's pids (hostPID),
the host's cgroup fs and /proc read-only, the SDK registry and /var/log/pods read-only, one writable emptyDir for its
spool; no privilege, no capability, a read-only root filesystem. A grant added later (a verb, a resource, a
writable host mount, a capability) fails here.
"""
from __future__ import annotations

from pathlib import Path

import yaml

from meterline.collectors.cli import collect_node

MANIFEST = Path(__file__).resolve().parents[1] / "deploy" / "k8s" / "node-collector.yaml"
DOCS = [d for d in yaml.safe_load_all(MANIFEST.read_text()) if d]
BY_KIND = {}
for doc in DOCS:
    BY_KIND.setdefault(doc["kind"], []).append(doc)


def test_the_only_grants_are_reading_pods_and_listing_namespaces():
    assert sorted(BY_KIND) == ["ClusterRole", "ClusterRoleBinding", "DaemonSet", "ServiceAccount"]  # no Role, no Secret
    (role,) = BY_KIND["ClusterRole"]
    assert role["rules"] == [{"apiGroups": [""], "resources": ["pods"], "verbs": ["get", "list", "watch"]},
                             {"apiGroups": [""], "resources": ["namespaces"], "verbs": ["list"]}]  # their labels
    assert "aggregationRule" not in role
    (binding,) = BY_KIND["ClusterRoleBinding"]
    (account,) = BY_KIND["ServiceAccount"]
    assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": role["metadata"]["name"]}
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": account["metadata"]["name"],
                                    "namespace": account["metadata"]["namespace"]}]


def _pod():
    (daemonset,) = BY_KIND["DaemonSet"]
    pod = daemonset["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    return pod, container


def test_the_pod_sees_host_pids_and_nothing_else_of_the_host():
    pod, container = _pod()
    (account,) = BY_KIND["ServiceAccount"]
    assert pod["serviceAccountName"] == account["metadata"]["name"]
    assert pod["hostPID"] is True
    for shared in ("hostNetwork", "hostIPC", "shareProcessNamespace"):
        assert not pod.get(shared), shared
    assert not pod.get("initContainers") and "ephemeralContainers" not in pod
    assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] != 0


def test_the_container_is_unprivileged_with_no_capabilities_and_a_read_only_root():
    _, container = _pod()
    ctx = container["securityContext"]
    assert ctx["privileged"] is False and ctx["allowPrivilegeEscalation"] is False
    assert ctx["readOnlyRootFilesystem"] is True
    assert ctx["capabilities"] == {"drop": ["ALL"]}  # nothing added back


def test_host_paths_are_mounted_read_only_and_only_the_spool_is_writable():
    pod, container = _pod()
    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts = {m["name"]: m for m in container["volumeMounts"]}
    assert set(mounts) == set(volumes)
    host = {name: v["hostPath"]["path"] for name, v in volumes.items() if "hostPath" in v}
    assert sorted(host.values()) == ["/proc", "/sys/fs/cgroup", "/var/lib/meterline/run", "/var/log/pods"]
    for name in host:
        assert mounts[name].get("readOnly") is True, name
    writable = [name for name, m in mounts.items() if not m.get("readOnly")]
    assert writable == ["spool"] and "emptyDir" in volumes["spool"]
    assert mounts["spool"]["mountPath"] == "/var/lib/meterline/spool"  # the Sender's spool under METERLINE_DATA_DIR


def test_the_command_reads_the_mounted_host_paths_with_options_the_collector_has():
    _, container = _pod()
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    args = container["args"]
    assert args[:2] == ["collect", "node"]
    options = dict(zip(args[2::2], args[3::2]))
    assert options["--cgroup-root"] == mounts["cgroup"] and options["--proc"] == mounts["proc"] and options["--level"] == "cgroup"
    assert options["--pods-url"].endswith("/api/v1/pods?fieldSelector=spec.nodeName=$(NODE_NAME)")  # this node's pods only
    import inspect

    known = {f"--{name.replace('_', '-')}" for name in inspect.signature(collect_node).parameters}
    assert set(options) <= known, set(options) - known  # every option exists (a typo would crash the DaemonSet)
    env = {e["name"]: e for e in container["env"]}
    assert env["METERLINE_DATA_DIR"]["value"] == "/var/lib/meterline"
