"""`meterline plan endpoints` (allocator/endpoints.py): replicas per self-hosted endpoint, on known answers."""
from __future__ import annotations

import json
import subprocess
import sys
from datetime import datetime, timedelta, timezone
from decimal import Decimal
from pathlib import Path

import pytest

from inprocess import open_ledger

METERLINE = str(Path(sys.executable).with_name("meterline"))


def meterline(args: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run([METERLINE, *args], capture_output=True, text=True, timeout=300)

from meterline.allocator import endpoints as ep


def test_erlang_c_matches_the_textbook_value():
    assert ep.erlang_c(6, 5.0) == pytest.approx(0.5875, abs=1e-4)  # c = 6 servers, a = 5 Erlangs
    assert ep.erlang_c(1, 0.5) == pytest.approx(0.5)  # M/M/1: P(wait) = ρ
    assert ep.p95_response_s(5, 10, 0.5) is None  # λ = cμ: unstable


def test_replicas_by_rate_latency_gpu_and_bounds():
    # λ = 10/s, S = 0.5 s: 5 requests in service; at 80 % that is ceil(6.25) = 7 replicas
    assert ep.recommend(10, 0.5, slo_ms=10_000, target_util=0.8) == ep.Advice(7, 968, "request rate")
    # 7 replicas: M/M/7 p95 ≈ 968 ms, 8: ≈ 702 ms; an 800 ms SLO needs 8
    assert ep.recommend(10, 0.5, slo_ms=800, target_util=0.8).replicas == 8
    assert ep.recommend(10, 0.5, slo_ms=800, target_util=0.8).reason == "latency SLO (M/M/c p95)"
    assert ep.recommend(10, 0.5, slo_ms=800, target_util=0.8, concurrency=4).replicas == 2  # 8 servers: ceil(5/3.2) = 2
    assert ep.recommend(10, 0.5, slo_ms=10_000, target_util=0.8, gpus=8, gpu_util_pct=90).replicas == 9  # ceil(7.2/0.8)
    assert ep.recommend(10, 0.5, slo_ms=800, target_util=0.8, max_replicas=7).replicas == 7
    assert ep.recommend(0, 0.5, slo_ms=800, min_replicas=2).replicas == 2
    slow = ep.recommend(10, 3.0, slo_ms=2_000, target_util=0.8)  # a 3 s call cannot answer within 2 s
    assert slow.replicas == 38 and "exceeds the SLO" in slow.reason  # ceil(30 / 0.8)


@pytest.fixture
def store(tmp_path):
    with open_ledger(tmp_path) as opened:
        yield opened


SINCE = datetime(2026, 1, 5, tzinfo=timezone.utc)


def seed(client) -> None:
    """600 calls of 500 ms to selfhosted/llama in a minute (10/s), 5 failed; one OpenAI call, not an endpoint;
    the serving process samples of 2 GPUs at 90 %."""
    from meterline.schemas.events import GpuSample, PricedEvent, new_id
    from meterline.sql.rows import contract_row, gpu_sample_row, insert_rows, with_offsets

    def call(i: int, provider: str = "selfhosted", status: str = "ok", latency: int = 500) -> PricedEvent:
        return PricedEvent(event_id=new_id(), ts=SINCE + timedelta(milliseconds=100 * i), tenant_id="acme",
                           session_id=f"s{i % 2}", kind="llm_call", provider=provider, model="llama", latency_ms=latency,
                           status=status, cost_usd=Decimal(0), list_cost_usd=Decimal(0), cost_source="catalog",
                           catalog_version="v", priced_at=SINCE)

    events = [call(i) for i in range(595)] + [call(595 + i, status="error", latency=30_000) for i in range(5)]
    events.append(call(0, provider="openai"))
    insert_rows(client, "priced_events", [with_offsets(contract_row(e), "priced", 0, i) for i, e in enumerate(events)])
    samples = [gpu_sample_row(GpuSample(sample_id=new_id(), ts=SINCE + timedelta(seconds=10 * k), node="n", level="process",
                                        gpu_index=g, gpu_uuid=f"G{g}", gpu_name="H100", interval_ms=10_000, pid=1,
                                        utilization_pct=90, attributed=True, tenant_id="acme", session_id=f"s{g}"),
                              Decimal(10), Decimal("0.01"), "v") for g in range(2) for k in range(6)]
    insert_rows(client, "gpu_samples", [with_offsets(r, "gpu", 0, i) for i, r in enumerate(samples)])


def test_the_ledger_gives_one_record_per_self_hosted_endpoint_and_the_command_prints_it(store, monkeypatch):
    client, direct, settings = store
    seed(client)
    until = SINCE + timedelta(minutes=1)
    default = ep.Bounds(slo_ms=800, target_util=0.8)
    [rec] = ep.recommendations(direct, SINCE, until, {}, default, until)
    assert (rec.endpoint, rec.requests, rec.rate_rps, rec.service_ms, rec.p95_latency_ms) == ("selfhosted/llama", 600,
                                                                                            Decimal(10), 500, 500)
    assert (rec.observed_replicas, rec.gpu_utilization_pct, rec.recommended_replicas) == (2, 90, 8)  # by latency, as above
    [lax] = ep.recommendations(direct, SINCE, until, {"llama": ep.Bounds(slo_ms=10_000, target_util=0.8)}, default, until)
    assert lax.recommended_replicas == 7
    client.close()  # the command opens the store itself, in its own process (chDB keeps one path per process)
    monkeypatch.setenv("METERLINE_DATA_DIR", str(settings.data_dir))
    monkeypatch.setenv("METERLINE_CLICKHOUSE_DSN", settings.dsn)
    result = meterline(["plan", "endpoints", "--since", "2026-01-05T00:00", "--until", "2026-01-05T00:01",
                                      "--target-util", "0.8", "--slo", "llama=800", "--json"])
    assert result.returncode == 0, result.stderr
    [doc] = json.loads(result.stdout)["endpoints"]
    assert (doc["recommended_replicas"], doc["rate_rps"], doc["predicted_p95_ms"]) == (8, "10.000000", 702)
    bad = meterline(["plan", "endpoints", "--slo", "llama"])
    assert bad.returncode == 1 and "MODEL=VALUE" in bad.stderr


def test_the_gauge_serves_the_latest_recommendation_per_endpoint(store):
    from prometheus_client import generate_latest

    from meterline.app.metrics import PipelineCollector, build_registry
    from meterline.app.report import load_query
    from meterline.schemas.events import ScaleRecommendation, new_id
    from meterline.sql.rows import insert_rows, plain_row, with_offsets

    client, direct, settings = store

    def rec(replicas: int, minutes: int) -> ScaleRecommendation:
        ts = SINCE + timedelta(minutes=minutes)
        return ScaleRecommendation(recommendation_id=new_id(), ts=ts, endpoint="selfhosted/llama", provider="selfhosted",
                                   model="llama", window_start=ts - timedelta(minutes=15), window_end=ts, requests=1,
                                   rate_rps=Decimal(1), service_ms=1, p95_latency_ms=1, slo_ms=1, target_utilization_pct=70,
                                   max_replicas=10, recommended_replicas=replicas)

    insert_rows(client, "scale_recommendations", [with_offsets(plain_row(r), "scale", 0, i)
                                                  for i, r in enumerate([rec(5, 2), rec(3, 1)])])
    rows = [(p, m, int(n)) for p, m, n in direct.query(load_query("scale_latest")).rows]
    assert rows == [("selfhosted", "llama", 5)]  # the newest, not the last written
    collector = PipelineCollector(settings, {}, lambda: None, dict, lambda: rows)
    collector._kafka_metrics = lambda: iter(())  # no broker here
    registry, _ = build_registry(collector)
    assert 'meterline_endpoint_recommended_replicas{model="llama",provider="selfhosted"} 5.0' in generate_latest(registry).decode()
