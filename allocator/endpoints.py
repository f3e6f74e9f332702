"""`meterline plan endpoints`: replicas per self-hosted inference endpoint, as ScaleRecommendation records.

For an endpoint with arrival rate λ (requests/s over the window), service time S (mean latency of successful
calls, s), `k` requests served at once per replica and target utilisation ρ:

    by rate:     r = ceil(λ·S / (k·ρ))                         (Little's law: λ·S requests in service on average)
    by GPU:      r = ceil(g·u / ρ)                             (g GPUs seen serving it, mean utilisation u)
    by latency:  the smallest r ≥ both whose M/M/c p95 response, c = r·k servers of rate μ = 1/S, is ≤ the SLO:
                 p95 ≈ S + max(0, ln(C(c, a) / 0.05) / (c·μ − λ)),  a = λ/μ, C = Erlang C (P(wait > t) = C·e^−(cμ−λ)t)

bounded by min..max replicas. When even max replicas (or any number: S alone over the SLO) cannot meet the
SLO, the recommendation is the larger of the others, bounded, and says so (predicted_p95_ms None only if
the queue would be unstable). The idle → busy release/reclaim decision needs the allocator engine: not here.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import datetime
from decimal import ROUND_HALF_EVEN, Decimal
from typing import Any

P95_TAIL = 0.05


@dataclass(frozen=True)
class Advice:
    replicas: int
    predicted_p95_ms: int | None
    reason: str


def erlang_c(servers: int, load: float) -> float:
    """Probability that an arrival waits in an M/M/c queue with offered load a = λ/μ (< c)."""
    b = 1.0  # Erlang B by its stable recurrence: B(n) = a·B(n−1) / (n + a·B(n−1))
    for n in range(1, servers + 1):
        b = load * b / (n + load * b)
    return servers * b / (servers - load * (1 - b))


def p95_response_s(servers: int, rate: float, service_s: float) -> float | None:
    """M/M/c p95 response time (service mean + p95 wait), None when the queue is unstable (λ ≥ cμ)."""
    mu = 1 / service_s
    if rate >= servers * mu:
        return None
    if rate == 0:
        return service_s
    c = erlang_c(servers, rate / mu)
    return service_s + (max(0.0, math.log(c / P95_TAIL)) / (servers * mu - rate) if c > P95_TAIL else 0.0)


def recommend(rate_rps: float, service_s: float, slo_ms: int, target_util: float = 0.7, min_replicas: int = 1,
              max_replicas: int = 100, concurrency: int = 1, gpus: int | None = None, gpu_util_pct: int | None = None) -> Advice:
    """Replicas for one endpoint (the module docstring's formula)."""
    by_rate = math.ceil(rate_rps * service_s / (concurrency * target_util) - 1e-9)
    by_gpu = math.ceil(gpus * gpu_util_pct / 100 / target_util - 1e-9) if gpus and gpu_util_pct is not None else 0
    base = max(by_rate, by_gpu, min_replicas)
    bounded = min(base, max_replicas)
    why = "GPU utilisation" if by_gpu > by_rate else "request rate"
    if service_s <= 0 or rate_rps <= 0:
        return Advice(bounded, round(service_s * 1000) if service_s > 0 else None, f"{why}; no load to queue")
    if service_s * 1000 > slo_ms:
        p95 = p95_response_s(bounded * concurrency, rate_rps, service_s)
        return Advice(bounded, _ms(p95), f"{why}; the service time alone ({service_s * 1000:.0f} ms) exceeds the SLO")
    for r in range(max(base, 1), max_replicas + 1):
        p95 = p95_response_s(r * concurrency, rate_rps, service_s)
        if p95 is not None and p95 * 1000 <= slo_ms:
            return Advice(r, _ms(p95), why if r == base else "latency SLO (M/M/c p95)")
    return Advice(max_replicas, _ms(p95_response_s(max_replicas * concurrency, rate_rps, service_s)),
                  f"max replicas; the SLO needs more than {max_replicas}")


def _ms(seconds: float | None) -> int | None:
    return None if seconds is None else math.ceil(seconds * 1000)


# ---- the ledger -> records ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Bounds:
    slo_ms: int = 2_000
    target_util: float = 0.7
    min_replicas: int = 1
    max_replicas: int = 100
    concurrency: int = 1


def recommendations(ledger: Any, since: datetime, until: datetime, bounds: dict[str, Bounds], default: Bounds,
                    now: datetime) -> list:
    """One ScaleRecommendation per self-hosted endpoint seen in the window (sql/queries/plan_endpoints.sql);
    `bounds` by model override `default`."""
    from meterline.app.report import load_query
    from meterline.schemas.events import ScaleRecommendation, build, new_id

    window_s = (until - since).total_seconds()
    rows = ledger.query(load_query("plan_endpoints"), {"since": since, "until": until}).dicts()
    out = []
    for row in rows:
        b = bounds.get(row["model"], default)
        rate = (Decimal(row["requests"]) / Decimal(str(window_s))).quantize(Decimal("1e-6"), ROUND_HALF_EVEN)
        service_s = float(row["service_ms"] or 0) / 1000
        gpus = int(row["gpus"] or 0) or None  # 0: no process samples carry the endpoint's sessions
        util = None if gpus is None or row["gpu_util"] is None or math.isnan(row["gpu_util"]) else round(row["gpu_util"])
        advice = recommend(float(rate), service_s, b.slo_ms, b.target_util, b.min_replicas, b.max_replicas, b.concurrency,
                           gpus, util)
        out.append(build(ScaleRecommendation, recommendation_id=new_id(), ts=now, endpoint=f"{row['provider']}/{row['model']}",
                         provider=row["provider"], model=row["model"], window_start=since, window_end=until,
                         requests=int(row["requests"]), rate_rps=rate, service_ms=round(row["service_ms"] or 0),
                         p95_latency_ms=round(row["p95_ms"] or 0), slo_ms=b.slo_ms,
                         target_utilization_pct=round(b.target_util * 100), concurrency=b.concurrency,
                         gpu_utilization_pct=util, observed_replicas=gpus, min_replicas=b.min_replicas,
                         max_replicas=b.max_replicas, recommended_replicas=advice.replicas,
                         predicted_p95_ms=advice.predicted_p95_ms, reason=advice.reason))
    return out


def publish(settings: Any, records: list) -> None:
    """To the compacted scale topic, keyed by endpoint: the latest per endpoint is what an autoscaler needs."""
    from confluent_kafka import Producer

    producer = Producer(settings.kafka_config(**{"enable.idempotence": True, "linger.ms": 0}))
    for r in records:
        producer.produce(settings.topic("scale"), key=r.key().encode(), value=r.to_json())
    if producer.flush(15):
        raise RuntimeError(f"the recommendations were not acknowledged by {settings.bootstrap} within 15 s")
