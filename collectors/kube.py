"""Pods of this node from the Kubernetes API: pod UID -> namespace, name and owner labels.

A pod labelled `meterline.io/tenant` (and optionally `meterline.io/team`, `/project`, `/agent`) is charged to
that tenant; a pod without the label takes its namespace's labels. Read from any URL that answers a PodList:
the API server (`/api/v1/pods?fieldSelector=spec.nodeName=<node>`) or the kubelet (`:10250/pods`), with the
pod's service-account token and CA when it runs in a cluster; namespaces from a NamespaceList URL. The lists
are re-read at most every `refresh_s`; a failed read keeps the last good lists (logged), so an API outage
never stops the collector, it only stops seeing new pods until the API answers again.
"""
from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx

log = logging.getLogger("meterline.collect.kube")
LABELS = {"tenant_id": "meterline.io/tenant", "team": "meterline.io/team", "project": "meterline.io/project",
          "agent_id": "meterline.io/agent"}
SERVICE_ACCOUNT = Path("/var/run/secrets/kubernetes.io/serviceaccount")


def owner_from_labels(pod_labels: dict[str, str], namespace_labels: dict[str, str]) -> dict[str, str]:
    """Owner fields from the pod's labels, else its namespace's; {} when neither names a tenant."""
    for labels in (pod_labels, namespace_labels):
        if labels.get(LABELS["tenant_id"]):
            return {field: labels[label] for field, label in LABELS.items() if labels.get(label)}
    return {}


def _items(doc: Any) -> list[dict]:
    items = doc.get("items") if isinstance(doc, dict) else None
    return [i for i in items if isinstance(i, dict) and isinstance(i.get("metadata"), dict)] if isinstance(items, list) else []


def _labels(meta: dict) -> dict[str, str]:
    labels = meta.get("labels")
    return {str(k): str(v) for k, v in labels.items()} if isinstance(labels, dict) else {}


def pods_from_list(doc: Any) -> dict[str, tuple[str, str, dict[str, str]]]:
    """pod UID -> (namespace, name, labels) from a PodList document (anything else: nothing)."""
    out = {}
    for item in _items(doc):
        meta = item["metadata"]
        if meta.get("uid") and meta.get("namespace") and meta.get("name"):
            out[str(meta["uid"])] = (str(meta["namespace"]), str(meta["name"]), _labels(meta))
    return out


def labels_from_namespaces(doc: Any) -> dict[str, dict[str, str]]:
    """namespace -> labels from a NamespaceList document."""
    return {str(i["metadata"]["name"]): _labels(i["metadata"]) for i in _items(doc) if i["metadata"].get("name")}


class PodDirectory:
    def __init__(self, pods_url: str, namespaces_url: str | None = None, *, token_file: Path | None = None,
                 ca_file: Path | None = None, refresh_s: float = 60.0, clock: Callable[[], float] = time.monotonic,
                 client: httpx.Client | None = None):
        in_cluster = SERVICE_ACCOUNT.is_dir()
        self.pods_url, self.namespaces_url = pods_url, namespaces_url
        self.token_file = token_file or (SERVICE_ACCOUNT / "token" if in_cluster else None)
        ca = ca_file or (SERVICE_ACCOUNT / "ca.crt" if in_cluster else None)
        self.client = client or httpx.Client(timeout=10.0, verify=str(ca) if ca else True)
        self.refresh_s, self.clock = refresh_s, clock
        self.pods: dict[str, tuple[str, str, dict[str, str]]] = {}
        self.namespaces: dict[str, dict[str, str]] = {}
        self._read_at: float | None = None

    def _get(self, url: str) -> Any:
        headers = {"Accept": "application/json"}
        if self.token_file:  # re-read each time: projected tokens rotate
            headers["Authorization"] = f"Bearer {Path(self.token_file).read_text().strip()}"
        response = self.client.get(url, headers=headers)
        response.raise_for_status()
        return response.json()

    def refresh(self) -> None:
        now = self.clock()
        if self._read_at is not None and now - self._read_at < self.refresh_s:
            return
        self._read_at = now
        try:
            self.pods = pods_from_list(self._get(self.pods_url))
            if self.namespaces_url:
                self.namespaces = labels_from_namespaces(self._get(self.namespaces_url))
        except (httpx.HTTPError, OSError, ValueError) as err:
            log.warning("pod list not read (%s); keeping the last one (%d pods)", err, len(self.pods))

    def pod(self, uid: str) -> tuple[str, str] | None:
        found = self.pods.get(uid)
        return (found[0], found[1]) if found else None

    def owner(self, uid: str) -> dict[str, str]:
        found = self.pods.get(uid)
        return owner_from_labels(found[2], self.namespaces.get(found[0], {})) if found else {}
