"""OTLP/HTTP endpoint throughput (POST /v1/traces) vs producing the same events with the SDK, same run.

    METERLINE_KAFKA_BOOTSTRAP=127.0.0.1:9092 .venv/bin/python -m bench.otlp [--spans 20000] [--batch 512] [--rounds 3]

Both sides end at the same place: the events acknowledged by the broker on the usage topic.

* OTLP: N GenAI spans made by a real TracerProvider (OpenAI-style chat spans with usage, tenant on
  the resource) are encoded once into ExportTraceServiceRequest batches of `--batch` spans (the
  BatchSpanProcessor's default size), exactly as the OTLP/HTTP exporter encodes them, and POSTed
  one after another over one keep-alive connection to an ApiServer (the `meterline up` API) in
  this process; the clock stops when the endpoint's Meter has delivered all N events.
  Variants: gzip bodies; a realistic trace (an agent turn, one chat, two tool/HTTP spans: 1 in 4
  spans is GenAI, rate counted in all spans); non-GenAI spans only (what ignoring costs).
* SDK baseline: the same N calls as `meter.record_llm(provider, model, tokens...)` on a Meter
  with the same tenant, until delivered.

Pre-encoding keeps the client's own cost (the exporter's encoding runs in the agent's process,
not in meterline's) out of the endpoint's number; the POSTing client shares this process, which
costs the endpoint a little GIL time. Writes bench/results/otlp.md.
"""
from __future__ import annotations

import argparse
import gzip
import os
import platform
import statistics
import subprocess
import tempfile
import time
import uuid
from pathlib import Path

import httpx
from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from meterline.app.api import ApiServer
from meterline.collectors import Meter
from meterline.settings import Settings
from meterline.topics import create_topics

RESULTS = Path(__file__).resolve().parent / "results" / "otlp.md"
CHAT = {"gen_ai.operation.name": "chat", "gen_ai.provider.name": "openai", "gen_ai.request.model": "gpt-4o",
        "gen_ai.response.model": "gpt-4o", "gen_ai.usage.input_tokens": 1200, "gen_ai.usage.output_tokens": 80,
        "gen_ai.usage.cache_read.input_tokens": 1000, "server.address": "api.openai.com"}
RESOURCE = {"service.name": "planner-agent", "meterline.tenant_id": "acme", "meterline.team": "search",
            "meterline.project": "rag"}


def make_spans(n: int, shape: str) -> list:
    """Finished SDK spans: `genai` (n chat spans), `trace` (n/4 traces of four spans, one GenAI),
    `plain` (n HTTP spans)."""
    memory = InMemorySpanExporter()
    provider = TracerProvider(resource=Resource.create(RESOURCE))
    provider.add_span_processor(SimpleSpanProcessor(memory))
    tracer = provider.get_tracer("bench")
    http = {"http.request.method": "GET", "url.full": "https://tools.example/search?q=x", "http.response.status_code": 200,
            "server.address": "tools.example", "network.protocol.version": "1.1"}
    if shape == "genai":
        for _ in range(n):
            with tracer.start_as_current_span("chat gpt-4o", attributes=CHAT):
                pass
    elif shape == "trace":
        for _ in range(n // 4):
            with tracer.start_as_current_span("agent turn", attributes={"app.step": "plan"}):
                with tracer.start_as_current_span("chat gpt-4o", attributes=CHAT):
                    pass
                with tracer.start_as_current_span("GET /search", attributes=http):
                    pass
                with tracer.start_as_current_span("tool lookup", attributes={"app.tool": "lookup"}):
                    pass
    else:
        for _ in range(n):
            with tracer.start_as_current_span("GET /search", attributes=http):
                pass
    provider.shutdown()
    return list(memory.get_finished_spans())


def encode(spans: list, batch: int, compress: bool) -> list[bytes]:
    bodies = [encode_spans(spans[i:i + batch]).SerializeToString() for i in range(0, len(spans), batch)]
    return [gzip.compress(b, compresslevel=6) for b in bodies] if compress else bodies


def bench_otlp(api: ApiServer, client: httpx.Client, bodies: list[bytes], events: int, compress: bool) -> tuple[float, float]:
    """(seconds until every event was delivered, process CPU seconds)."""
    headers = {"Content-Type": "application/x-protobuf", **({"Content-Encoding": "gzip"} if compress else {})}
    stats = api.otlp.meter().stats
    delivered0 = stats.delivered
    cpu0, t0 = time.process_time(), time.perf_counter()
    for body in bodies:
        answer = client.post(f"{api.url}/v1/traces", content=body, headers=headers)
        assert answer.status_code == 200 and not answer.content, (answer.status_code, answer.content[:200])
    assert api.otlp.meter().flush(300), "the broker should take every event"
    wall, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    assert stats.delivered - delivered0 == events, (stats.delivered - delivered0, events)
    return wall, cpu


def bench_sdk(meter: Meter, calls: int) -> tuple[float, float]:
    delivered0 = meter.stats.delivered
    record = meter.record_llm
    cpu0, t0 = time.process_time(), time.perf_counter()
    for _ in range(calls):
        record("openai", "gpt-4o", 1200, 80, 1000, 0, 950, "ok", None)
    assert meter.flush(300), "the broker should take every event"
    wall, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    assert meter.stats.delivered - delivered0 == calls
    return wall, cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--spans", type=int, default=20_000, help="GenAI spans per OTLP run (and SDK calls)")
    parser.add_argument("--batch", type=int, default=512, help="spans per request (the BatchSpanProcessor's default)")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()

    settings = Settings(data_dir=Path(tempfile.mkdtemp(prefix="meterline-bench-")), topic_prefix=f"bench{uuid.uuid4().hex[:8]}")
    create_topics(settings)
    api = ApiServer(lambda: None, port=0, settings=settings)
    api.start()
    meter = Meter(settings, tenant_id="acme", team="search", project="rag", agent_id="planner", register_pid=False)
    n, quarter = args.spans, args.spans // 4 * 4
    genai = make_spans(n, "genai")
    cases = {  # name -> (bodies, events expected, spans sent, gzip)
        "protobuf": (encode(genai, args.batch, False), n, n, False),
        "protobuf + gzip": (encode(genai, args.batch, True), n, n, True),
        "agent traces, 1 in 4 spans GenAI": (encode(make_spans(quarter, "trace"), args.batch, False), quarter // 4, quarter, False),
        "non-GenAI spans only": (encode(make_spans(n, "plain"), args.batch, False), 0, n, False),
    }
    sample = cases["protobuf"][0][0]
    rows: dict[str, list[tuple[float, float]]] = {name: [] for name in cases}
    sdk_rows: list[tuple[float, float]] = []
    with httpx.Client(timeout=120) as client:
        bench_otlp(api, client, cases["protobuf"][0][:4], min(n, 4 * args.batch), False)  # warm-up: producer, connection, caches
        bench_sdk(meter, 2000)
        for _ in range(args.rounds):
            sdk_rows.append(bench_sdk(meter, n))
            for name, (bodies, events, _, compress) in cases.items():
                rows[name].append(bench_otlp(api, client, bodies, events, compress))
    counters = (api.otlp.metered, api.otlp.nested, api.otlp.ignored, api.otlp.invalid)
    meter.close()
    api.stop()

    sdk_rate = statistics.median(n / wall for wall, _ in sdk_rows)
    sdk_cpu = statistics.median(cpu / n for _, cpu in sdk_rows) * 1e6
    table = []
    for name, (bodies, events, spans, compress) in cases.items():
        rate = statistics.median(spans / wall for wall, _ in rows[name])
        cpu = statistics.median(cpu / spans for _, cpu in rows[name]) * 1e6
        table.append((name, len(bodies), sum(map(len, bodies)) / spans, events, spans, rate, cpu, rows[name]))
    report = render(args, sample, sdk_rate, sdk_cpu, sdk_rows, table, counters)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(report)
    print(report)


def render(args, sample: bytes, sdk_rate: float, sdk_cpu: float, sdk_rows, table, counters) -> str:
    cpu = subprocess.run(["sh", "-c", "grep -m1 'model name' /proc/cpuinfo | cut -d: -f2"], capture_output=True, text=True).stdout.strip()
    load = os.getloadavg()[0]
    lines = [
        "## OTLP/HTTP traces endpoint vs the SDK (bench/otlp.py)",
        "",
        f"Machine: `{platform.machine()}`, {os.cpu_count()} CPUs ({cpu}), Python {platform.python_version()}, "
        f"librdkafka {__import__('confluent_kafka').libversion()[0]}, load average {load:.1f} at the end; "
        "broker: the shared single-node dev broker.",
        f"Command: `METERLINE_KAFKA_BOOTSTRAP=127.0.0.1:9092 .venv/bin/python -m bench.otlp --spans {args.spans} "
        f"--batch {args.batch} --rounds {args.rounds}`",
        f"One request: {args.batch} spans, {len(sample)} bytes of protobuf; each run ends when every event is acknowledged.",
        "",
        "| path | requests | bytes/span | events | spans/s (median) | CPU µs/span | ratio to SDK events/s |",
        "|---|---:|---:|---:|---:|---:|---:|",
        f"| SDK `meter.record_llm(...)` (baseline) | — | — | {args.spans} | {sdk_rate:,.0f} | {sdk_cpu:.1f} | 1.00 |",
        *(f"| POST /v1/traces, {name} | {requests} | {size:.0f} | {events} | {rate:,.0f} | {cpu_us:.1f} | "
          f"**{rate / sdk_rate:.2f}** |" for name, requests, size, events, _, rate, cpu_us, _ in table),
        "",
        "Per round, spans (or SDK calls) per second:",
        "",
        "| round | SDK | " + " | ".join(name for name, *_ in table) + " |",
        "|---:|---:|" + "---:|" * len(table),
        *(f"| {i + 1} | {args.spans / sdk_rows[i][0]:,.0f} | "
          + " | ".join(f"{spans / rounds[i][0]:,.0f}" for *_, spans, _, _, rounds in table) + " |"
          for i in range(len(sdk_rows))),
        "",
        f"Endpoint counters after the run (warm-up included): metered {counters[0]}, nested {counters[1]}, "
        f"ignored {counters[2]}, invalid {counters[3]}.",
        "CPU is the whole process (client, API thread, the endpoint's worker, the Meter's sender), per span sent. "
        "The SDK's agent-thread cost is ~0.5 µs per call (bench/sdk.py); its sender thread makes the id, encodes "
        "and produces. Per GenAI span the endpoint's one worker thread decodes protobuf (upb), converts the "
        "span's attributes and builds a SpanView (app/otlp.py), maps it and builds the event through the pydantic "
        "contract (genai.to_event), settles it with genai.Nesting and sends it with Meter.send (pydantic JSON). A "
        "non-GenAI span costs a search of its bytes for a GenAI key prefix; a body with none is only counted. "
        "The machine is shared: absolute rates vary; the ratio is the number to read.",
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
