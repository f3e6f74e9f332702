"""Property tests (hypothesis): the ComputeSample contract and the DCGM page mapper on generated input.

* ComputeSample: every sample the contract accepts survives the wire unchanged (to_json -> decode), its cpu_seconds
  is user + system exactly, and any mutation of a field is accepted or refused with InvalidEvent, never another error.
* map_page: any Prometheus page (the exporter's metric and label names with arbitrary values, or arbitrary text)
  gives GpuSample rows that survive the wire, or ScrapeError; no other exception escapes to the collector's loop.
"""
from __future__ import annotations

import json
from datetime import datetime, timezone
from decimal import Decimal

from hypothesis import HealthCheck, given, settings as hsettings, strategies as st

from meterline.collectors.dcgm import METRICS, DcgmState, PodOwners, ScrapeError, map_page
from meterline.schemas import InvalidEvent, decode
from meterline.schemas.events import ComputeSample, GpuSample, new_id

ids = st.text(st.characters(codec="utf-8", categories=("L", "N"), include_characters="-_."), min_size=1, max_size=24)
exact = st.decimals(min_value=0, max_value=10**6, places=6, allow_nan=False, allow_infinity=False)
counts = st.integers(min_value=0, max_value=2**62)


@st.composite
def compute_samples(draw) -> ComputeSample:
    owned = draw(st.booleans())
    owner = {"tenant_id": draw(ids), "team": draw(st.one_of(st.just(""), ids)), "session_id": draw(ids), "attributed": True} if owned else {}
    level = draw(st.sampled_from(["process", "cgroup"]))
    return ComputeSample(
        sample_id=new_id(), ts=draw(st.datetimes(min_value=datetime(2000, 1, 1), max_value=datetime(2026, 1, 1), timezones=st.just(timezone.utc))),
        node=draw(ids), node_class=draw(ids), level=level, pid=draw(counts) if level == "process" else None,
        cgroup=draw(st.text(max_size=40).filter(lambda t: t.isprintable())), container_id=draw(st.one_of(st.just(""), ids)),
        runtime=draw(st.sampled_from(["", "containerd", "cri-o", "docker", "podman"])), namespace=draw(st.one_of(st.just(""), ids)),
        interval_ms=draw(st.integers(1, 3_600_000)), cpu_user_seconds=draw(exact), cpu_system_seconds=draw(exact),
        memory_bytes=draw(counts), memory_peak_bytes=draw(counts), memory_byte_seconds=draw(exact),
        simulated=draw(st.booleans()), **owner)


@given(compute_samples())
def test_a_valid_compute_sample_survives_the_wire_exactly(sample):
    back = decode(ComputeSample, sample.to_json())
    assert back == sample
    assert back.cpu_seconds == sample.cpu_user_seconds + sample.cpu_system_seconds  # exact Decimal, no float
    assert back.key == (sample.tenant_id or "unattributed")


json_values = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
                           lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
                           max_leaves=5)


@hsettings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(compute_samples(), st.dictionaries(st.sampled_from(sorted(ComputeSample.model_fields) + ["extra", "cpu_seconds"]),
                                          json_values, min_size=1, max_size=4))
def test_a_mutated_compute_sample_is_accepted_or_refused_with_invalid_event(sample, mutation):
    record = {**json.loads(sample.to_json()), **mutation}
    try:
        decoded = decode(ComputeSample, json.dumps(record, allow_nan=True))
    except InvalidEvent:
        return
    assert isinstance(decoded.cpu_user_seconds, Decimal) and decoded.interval_ms > 0  # what it accepts keeps the contract


# ---- DCGM pages ------------------------------------------------------------------------------------

LABELS = ("gpu", "UUID", "uuid", "modelName", "Hostname", "GPU_I_ID", "GPU_I_PROFILE", "pod", "namespace", "container",
          "pod_name", "pod_namespace", "vgpu")
label_values = st.one_of(st.sampled_from(["0", "1", "7", "GPU-1111", "NVIDIA H100 80GB HBM3", "NVIDIA A30", "3g.40gb",
                                          "1g.10gb", "1c.3g.40gb", "9g.1gb", "ns", "pod-a", "x", "3g.40gb\u202e", "a\x00b",
                                          "1" * 300]),
                         st.text(max_size=12))
numbers = st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.integers(-10**20, 10**20))


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _number(value) -> str:
    if isinstance(value, float) and value != value:
        return "NaN"
    if value in (float("inf"), float("-inf")):
        return "+Inf" if value > 0 else "-Inf"
    return repr(value)


@st.composite
def dcgm_pages(draw) -> str:
    lines = []
    for name in draw(st.lists(st.sampled_from(sorted(METRICS) + ["DCGM_FI_DEV_SM_CLOCK", "up"]), min_size=1, max_size=6, unique=True)):
        lines.append(f"# TYPE {name} {draw(st.sampled_from(['gauge', 'counter', 'untyped']))}")
        for _ in range(draw(st.integers(1, 4))):
            device = draw(st.sampled_from([{}, {"gpu": "0", "UUID": "GPU-1111", "modelName": "NVIDIA H100 80GB HBM3"},
                                           {"gpu": "1", "UUID": "GPU-2222", "modelName": "NVIDIA A30", "GPU_I_PROFILE": "1g.6gb"}]))
            labels = {**device, **draw(st.dictionaries(st.sampled_from(LABELS), label_values, max_size=6))}  # mostly a device
            body = ",".join(f'{k}="{_escape(v)}"' for k, v in labels.items())
            lines.append(f"{name}{{{body}}} {_number(draw(numbers))}")
    return "\n".join(lines) + "\n"


def _mapped_or_refused(text: str, owners: PodOwners) -> None:
    state = DcgmState()
    try:
        for now in (0.0, 30.0):  # two scrapes: the second has an interval and energy deltas
            scrape = map_page(text, state, owners, now=now)
            for row in scrape.rows:
                assert decode(GpuSample, row.to_json()) == row  # every row keeps the contract
            assert scrape.skipped <= scrape.series
    except ScrapeError as err:
        assert str(err)  # a clear reason for the warning line


@hsettings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(dcgm_pages())
def test_any_exporter_shaped_page_maps_to_rows_or_a_scrape_error(text):
    _mapped_or_refused(text, PodOwners())


@hsettings(max_examples=200, deadline=None)
@given(st.text(max_size=300))
def test_arbitrary_text_maps_to_rows_or_a_scrape_error(text):
    _mapped_or_refused(text, PodOwners())
