"""POST /v1/traces (app/otlp.py): any OTLP exporter meters GenAI spans through `meterline up`'s API.

Against the real aiohttp ApiServer, the real OpenTelemetry OTLP/HTTP exporter (protobuf, gzip on
and off) and the real broker: GenAI spans land on the usage topic with their tokens, model,
provider and tenant; other spans are ignored; hand-written OTLP JSON works too; a tenant token's
tenant beats the payload's; a reader token is refused; oversized bodies and gzip bombs are 413,
garbage 400. The decoding layer (decompression bounds, AnyValue, ancestry, nesting) is also tested
without Kafka, through `process()` with a list as the sink.
"""
from __future__ import annotations

import gzip
import json
import zlib

import httpx
import pytest
from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
from opentelemetry.exporter.otlp.proto.http import Compression
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceResponse
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor, SpanExportResult
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from prometheus_client import CollectorRegistry

from collectors_kafka import read_topic
from meterline.app import otlp
from meterline.app.api import ApiServer
from meterline.app.auth import TokenStore
from meterline.collectors.genai import Nesting
from meterline.schemas import decode
from meterline.schemas.events import UsageEvent

CHAT = {"gen_ai.operation.name": "chat", "gen_ai.provider.name": "openai", "gen_ai.request.model": "gpt-4o",
        "gen_ai.response.model": "gpt-4o-2024-08-06", "gen_ai.usage.input_tokens": 1200,
        "gen_ai.usage.output_tokens": 80, "gen_ai.usage.cache_read.input_tokens": 1000}
TRACE = "5b8efff798038103d269b633813fc60c"


# ---- helpers -----------------------------------------------------------------------------------


def recorded_spans(build, resource: dict | None = None) -> list:
    """Spans made by a real TracerProvider: `build(tracer)` makes them; they are returned finished."""
    memory = InMemorySpanExporter()
    provider = TracerProvider(resource=Resource.create(resource or {}))
    provider.add_span_processor(SimpleSpanProcessor(memory))
    build(provider.get_tracer("test"))
    provider.shutdown()
    return list(memory.get_finished_spans())


def agent_run(tracer) -> None:
    with tracer.start_as_current_span("agent run", attributes={"meterline.team": "search"}):
        with tracer.start_as_current_span("chat gpt-4o", attributes=CHAT):
            pass
        with tracer.start_as_current_span("http GET", attributes={"http.request.method": "GET", "url.full": "http://x"}):
            pass


def exporter(api: ApiServer, token: str | None = None, compression: Compression = Compression.NoCompression) -> OTLPSpanExporter:
    headers = {"Authorization": f"Bearer {token}"} if token else None
    return OTLPSpanExporter(endpoint=f"{api.url}/v1/traces", headers=headers, compression=compression, timeout=30)


def usage_events(api: ApiServer, settings, at_least: int) -> list[UsageEvent]:
    assert api.otlp.meter().flush(60), "the endpoint's Meter should deliver everything"
    return [decode(UsageEvent, m.value()) for m in read_topic(settings, settings.topic("usage"), at_least)]


def post(api: ApiServer, body: bytes, content_type: str = otlp.PROTOBUF, token: str | None = None, **headers: str):
    headers = {"Content-Type": content_type, **headers}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    return httpx.post(f"{api.url}/v1/traces", content=body, headers=headers, timeout=60)


def kv(key: str, value) -> dict:
    if isinstance(value, bool):
        return {"key": key, "value": {"boolValue": value}}
    if isinstance(value, int):
        return {"key": key, "value": {"intValue": str(value)}}  # OTLP JSON: int64 as a decimal string
    if isinstance(value, float):
        return {"key": key, "value": {"doubleValue": value}}
    return {"key": key, "value": {"stringValue": value}}


def json_span(span_id: str, name: str, attrs: dict, parent: str = "", start: int = 1_700_000_000_000_000_000,
              end: int = 1_700_000_001_250_000_000, trace: str = TRACE, **extra) -> dict:
    return {"traceId": trace, "spanId": span_id, "parentSpanId": parent, "name": name, "kind": 3,
            "startTimeUnixNano": str(start), "endTimeUnixNano": str(end),
            "attributes": [kv(k, v) for k, v in attrs.items()], "status": {}, **extra}


def json_request(spans: list[dict], resource: dict | None = None) -> dict:
    return {"resourceSpans": [{"resource": {"attributes": [kv(k, v) for k, v in (resource or {}).items()]},
                               "scopeSpans": [{"scope": {"name": "hand-written"}, "spans": spans}]}]}


class Sink(list):
    send = list.append


def run(request: dict | bytes, content_type: str = otlp.JSON, nesting: Nesting | None = None,
        tenant: str | None = None) -> tuple[list[UsageEvent], otlp.Outcome]:
    """process() without HTTP or Kafka."""
    body = json.dumps(request).encode() if isinstance(request, dict) else request
    fmt = otlp.FORMATS[content_type]
    sink, outcome = Sink(), otlp.Outcome()
    otlp.process(fmt, fmt.parse(body), body, Nesting() if nesting is None else nesting, outcome, sink.send, tenant)
    return list(sink), outcome


@pytest.fixture
def api(settings, tmp_path):
    """An ApiServer on a free port with Kafka; open (no token) unless the test creates tokens."""
    server = ApiServer(lambda: None, port=0, settings=settings, tokens=TokenStore(tmp_path / "tokens.json"),
                       registry=CollectorRegistry())
    server.start()
    yield server
    server.stop()


# ---- the real exporter through the real server to the real usage topic ---------------------------------


@pytest.mark.parametrize("compression", [Compression.NoCompression, Compression.Gzip])
def test_the_otlp_exporter_meters_genai_spans_and_ignores_the_rest(api, settings, compression):
    spans = recorded_spans(agent_run, {"meterline.tenant_id": "acme", "service.name": "agent"})
    assert exporter(api, compression=compression).export(spans) is SpanExportResult.SUCCESS
    [event] = usage_events(api, settings, 1)
    assert (event.tenant_id, event.team) == ("acme", "search")  # resource, and the ancestor span in the payload
    assert (event.kind, event.provider, event.model) == ("llm_call", "openai", "gpt-4o-2024-08-06")
    assert (event.input_tokens, event.output_tokens, event.cache_read_tokens) == (1200, 80, 1000)
    chat = next(s for s in spans if s.name == "chat gpt-4o")
    assert event.attributes["trace_id"] == f"{chat.context.trace_id:032x}"
    assert event.attributes["span_id"] == f"{chat.context.span_id:016x}" and event.status == "ok"
    assert (api.otlp.metered, api.otlp.ignored, api.otlp.invalid) == (1, 2, 0)


def test_many_spans_in_batches_and_the_metrics(api, settings):
    def calls(tracer):
        for i in range(200):
            with tracer.start_as_current_span("turn"):
                model = "claude-sonnet-4" if i % 2 else "gpt-4o"
                provider = "anthropic" if i % 2 else "openai"
                with tracer.start_as_current_span("chat", attributes={**CHAT, "gen_ai.provider.name": provider,
                                                                      "gen_ai.request.model": model,
                                                                      "gen_ai.response.model": model,
                                                                      "gen_ai.usage.input_tokens": 1000 + i,
                                                                      "gen_ai.usage.cache_read.input_tokens": 0,
                                                                      "meterline.tenant_id": f"t{i % 3}"}):
                    pass

    spans = recorded_spans(calls)
    sender = exporter(api, compression=Compression.Gzip)
    for start in range(0, len(spans), 64):
        assert sender.export(spans[start:start + 64]) is SpanExportResult.SUCCESS
    events = usage_events(api, settings, 200)
    assert len(events) == 200 and len({e.event_id for e in events}) == 200
    assert sorted(e.input_tokens for e in events) == list(range(1000, 1200))
    assert {(e.tenant_id, e.provider, e.model) for e in events if e.input_tokens % 2} == {
        (f"t{i % 3}", "anthropic", "claude-sonnet-4") for i in range(1, 200, 2)}
    metrics = httpx.get(f"{api.url}/metrics", timeout=30).text
    assert 'meterline_otlp_spans_total{outcome="metered"} 200.0' in metrics
    assert 'meterline_otlp_spans_total{outcome="ignored"} 200.0' in metrics
    assert 'meterline_otlp_requests_total{code="200"} 7.0' in metrics


def test_nested_genai_spans_are_one_call_across_batches(api, settings):
    def layered(tracer):  # a framework's span around the SDK's own span of the same call
        with tracer.start_as_current_span("langchain ChatOpenAI", attributes={**CHAT, "meterline.tenant_id": "acme"}):
            with tracer.start_as_current_span("retry wrapper"):
                with tracer.start_as_current_span("openai chat", attributes={**CHAT, "gen_ai.usage.output_tokens": 81}):
                    pass

    spans = recorded_spans(layered, {"meterline.tenant_id": "acme"})  # children end first
    assert [s.name for s in spans] == ["openai chat", "retry wrapper", "langchain ChatOpenAI"]
    sender = exporter(api)
    for span in spans:  # one span per request: the cover waits for the parent across batches
        assert sender.export([span]) is SpanExportResult.SUCCESS
    [event] = usage_events(api, settings, 1)
    assert event.output_tokens == 81  # the innermost span wins
    assert event.tenant_id == "acme" and (api.otlp.metered, api.otlp.nested, api.otlp.ignored) == (1, 1, 1)


def test_hand_written_otlp_json_plain_and_gzip(api, settings):
    request = json_request([
        json_span("eee19b7ec3c1b174", "invoke_agent planner", {"gen_ai.operation.name": "invoke_agent",
                                                               "meterline.project": "rag"}),
        json_span("eee19b7ec3c1b175", "chat", {**CHAT, "gen_ai.conversation.id": "conv-7"}, parent="eee19b7ec3c1b174"),
        json_span("eee19b7ec3c1b176", "SELECT", {"db.system": "postgresql"}, parent="eee19b7ec3c1b174"),
    ], resource={"meterline.tenant_id": "acme", "service.name": "agent-ts"})
    body = json.dumps(request).encode()
    plain = post(api, body, otlp.JSON)
    assert plain.status_code == 200 and plain.json() == {} and plain.headers["Content-Type"].startswith(otlp.JSON)
    zipped = post(api, gzip.compress(body), otlp.JSON, **{"Content-Encoding": "gzip"})
    assert zipped.status_code == 200 and zipped.json() == {}
    events = usage_events(api, settings, 2)
    assert len(events) == 2  # the same span twice is two deliveries: the exporter, not meterline, retries
    for event in events:
        assert (event.tenant_id, event.project, event.session_id) == ("acme", "rag", "conv-7")
        assert (event.input_tokens, event.output_tokens, event.cache_read_tokens) == (1200, 80, 1000)
        assert event.latency_ms == 1250 and event.ts.timestamp() == 1_700_000_001.25
        assert event.attributes["trace_id"] == TRACE and event.attributes["span_id"] == "eee19b7ec3c1b175"


# ---- who may post, and for whom ---------------------------------------------------------------------------


def test_a_tenant_token_overrides_the_payload_tenant_and_a_reader_is_refused(api, settings):
    tenant = api.tokens.create("globex-agent", "tenant:globex")
    admin = api.tokens.create("ops", "admin")
    reader = api.tokens.create("finance", "reader")

    def spans(tracer):
        with tracer.start_as_current_span("chat", attributes={**CHAT, "meterline.tenant_id": "acme"}):
            pass
        with tracer.start_as_current_span("chat", attributes={**CHAT, "gen_ai.usage.output_tokens": 7}):
            pass  # no tenant anywhere: the token's

    finished = recorded_spans(spans, {"meterline.tenant_id": "initech"})
    assert exporter(api).export(finished) is SpanExportResult.FAILURE  # tokens exist: none is refused (401)
    assert exporter(api, reader).export(finished) is SpanExportResult.FAILURE
    refused = post(api, encode_spans(finished).SerializeToString(), token=reader)
    assert refused.status_code == 403 and b"cannot write usage" in refused.content
    assert exporter(api, tenant, Compression.Gzip).export(finished) is SpanExportResult.SUCCESS
    events = usage_events(api, settings, 2)
    assert sorted((e.tenant_id, e.output_tokens) for e in events) == [("globex", 7), ("globex", 80)]
    assert [m.key() for m in read_topic(settings, settings.topic("usage"), 2)] == [b"globex", b"globex"]

    assert exporter(api, admin).export(finished) is SpanExportResult.SUCCESS  # admin: the payload's attribution
    events = usage_events(api, settings, 4)
    assert sorted(e.tenant_id for e in events) == ["acme", "globex", "globex", "initech"]
    assert api.otlp.requests[403] == 2 and api.otlp.requests[200] == 2


# ---- bounds and broken bodies -----------------------------------------------------------------------------


def test_oversized_bodies_gzip_bombs_and_garbage(api):
    assert post(api, b"\0" * (otlp.MAX_BODY_BYTES + 1)).status_code == 413
    bomb = gzip.compress(b"\0" * (64 << 20), compresslevel=9)  # 64 MiB of zeros in ~64 KiB
    assert len(bomb) < otlp.MAX_BODY_BYTES
    answer = post(api, bomb, **{"Content-Encoding": "gzip"})
    assert answer.status_code == 413 and b"decompresses to over" in answer.content
    status = answer.content  # a google.rpc.Status: code 8 (RESOURCE_EXHAUSTED), then the message
    assert status[:2] == b"\x08\x08" and status[2] == 0x12
    assert post(api, b"this is not protobuf").status_code == 400
    assert post(api, b"{not json", otlp.JSON).status_code == 400
    assert post(api, b'{"resourceSpans": 5}', otlp.JSON).status_code == 400
    wrong_shape = post(api, json.dumps(json_request([{"name": "x", "attributes": "gen_ai.usage"}])).encode(), otlp.JSON)
    assert wrong_shape.status_code == 400 and wrong_shape.json()["code"] == 3
    assert post(api, b"\x1f\x8b garbage", **{"Content-Encoding": "gzip"}).status_code == 400
    truncated = gzip.compress(json.dumps(json_request([json_span("00000000000000aa", "chat", CHAT)])).encode())[:-30]
    assert post(api, truncated, otlp.JSON, **{"Content-Encoding": "gzip"}).status_code == 400
    assert post(api, b"{}", "text/plain").status_code == 415
    assert post(api, b"{}", otlp.JSON, **{"Content-Encoding": "lz4"}).status_code == 415
    assert api.otlp._meter is None  # nothing was metered: no producer was made


def test_invalid_genai_spans_are_a_partial_success(api, settings):
    def spans(tracer):
        with tracer.start_as_current_span("chat", attributes={**CHAT, "meterline.tenant_id": "acme"}):
            pass
        with tracer.start_as_current_span("broken", attributes={**CHAT, "meterline.tenant_id": "acme",
                                                                "gen_ai.usage.input_tokens": "lots"}):
            pass
        with tracer.start_as_current_span("no tenant", attributes=CHAT):
            pass

    body = encode_spans(recorded_spans(spans)).SerializeToString()
    answer = post(api, body)
    assert answer.status_code == 200 and answer.headers["Content-Type"].startswith(otlp.PROTOBUF)
    response = ExportTraceServiceResponse.FromString(answer.content)
    assert response.partial_success.rejected_spans == 2
    assert "'broken'" in response.partial_success.error_message and "tenant_id" in response.partial_success.error_message
    [event] = usage_events(api, settings, 1)
    assert event.tenant_id == "acme" and event.input_tokens == 1200

    as_json = post(api, json.dumps(json_request([json_span("00000000000000aa", "broken", {**CHAT, "gen_ai.usage.input_tokens": -1,
                                                                                          "meterline.tenant_id": "acme"})])).encode(),
                   otlp.JSON)
    assert as_json.status_code == 200
    partial = as_json.json()["partialSuccess"]
    assert partial["rejectedSpans"] == "1" and "input_tokens" in partial["errorMessage"]


# ---- the decoding layer, without HTTP or Kafka -----------------------------------------------------------------


def test_decompress_is_bounded_for_gzip_and_deflate():
    data = b"spans" * 1000
    assert otlp.decompress(gzip.compress(data), "gzip") == data
    assert otlp.decompress(gzip.compress(data[:10]) + gzip.compress(data[10:]), "gzip") == data  # two members
    assert otlp.decompress(zlib.compress(data), "deflate") == data
    raw = zlib.compressobj(wbits=-15)
    assert otlp.decompress(raw.compress(data) + raw.flush(), "deflate") == data
    assert otlp.decompress(data, "identity") == data and otlp.decompress(data, "") == data
    with pytest.raises(otlp.OtlpError) as err:
        otlp.decompress(gzip.compress(data), "gzip", limit=len(data) - 1)
    assert err.value.status == 413
    assert otlp.decompress(gzip.compress(data), "gzip", limit=len(data)) == data
    with pytest.raises(otlp.OtlpError) as err:  # the limit holds across members too
        otlp.decompress(gzip.compress(data) + gzip.compress(data), "gzip", limit=len(data) + 1)
    assert err.value.status == 413


def test_json_any_values_ids_and_snake_case():
    attrs = [kv("s", "x"), {"key": "i", "value": {"intValue": 5}}, {"key": "j", "value": {"intValue": "-7"}},
             {"key": "d", "value": {"doubleValue": 1.5}}, {"key": "b", "value": {"boolValue": False}},
             {"key": "a", "value": {"arrayValue": {"values": [{"stringValue": "p"}, {"intValue": "2"}]}}},
             {"key": "m", "value": {"kvlistValue": {"values": [kv("inner", "v")]}}},
             {"key": "raw", "value": {"bytesValue": "AAE="}}, {"key": "empty", "value": {}},
             {"key": "snake", "value": {"string_value": "ok"}}]
    assert otlp._Json.attrs(attrs) == {"s": "x", "i": 5, "j": -7, "d": 1.5, "b": False, "a": ("p", 2), "m": {"inner": "v"},
                                       "raw": b"\x00\x01", "empty": None, "snake": "ok"}
    for bad in ({"intValue": "5.0"}, {"intValue": 5.0}, {"intValue": "1_000"}, {"stringValue": 5}, {"boolValue": "true"}):
        with pytest.raises((TypeError, ValueError)):
            otlp._json_value(bad)
    deep = {"stringValue": "bottom"}
    for _ in range(otlp.MAX_VALUE_DEPTH + 1):
        deep = {"arrayValue": {"values": [deep]}}
    with pytest.raises(ValueError):
        otlp._json_value(deep)

    snake = {"resource_spans": [{"resource": {"attributes": [kv("meterline.tenant_id", "acme")]}, "scope_spans": [{"spans": [
        {"trace_id": TRACE.upper(), "span_id": "00000000000000AB", "name": "chat", "start_time_unix_nano": 1_000_000_000,
         "end_time_unix_nano": 3_000_000_000, "attributes": [kv(k, v) for k, v in CHAT.items()], "status": {"code": 2}}]}]}]}
    [event], outcome = run(snake)
    assert event.tenant_id == "acme" and event.latency_ms == 2000 and event.status == "error"
    assert event.attributes["trace_id"] == TRACE and event.attributes["span_id"] == "00000000000000ab"
    _, outcome = run(json_request([json_span("zz" * 8, "chat", {**CHAT, "meterline.tenant_id": "acme"})]))
    assert outcome.invalid == 1 and "spanId" in outcome.error_message


def test_ancestor_attribution_is_per_trace_and_nearest_first():
    spans = [
        json_span("0000000000000001", "root", {"meterline.tenant_id": "acme", "meterline.team": "ops"}),
        json_span("0000000000000002", "step", {"meterline.team": "search"}, parent="0000000000000001"),
        json_span("0000000000000003", "tool", {"http.method": "GET"}, parent="0000000000000002"),
        json_span("0000000000000004", "chat", CHAT, parent="0000000000000003"),
        # same span ids in another trace: not an ancestor of anything above
        json_span("0000000000000002", "other", {"meterline.tenant_id": "globex"}, trace="1" * 32),
        json_span("0000000000000005", "chat", CHAT, parent="0000000000000002", trace="1" * 32),
    ]
    events, outcome = run(json_request(spans, {"meterline.project": "from-resource"}))
    assert sorted((e.tenant_id, e.team, e.project) for e in events) == [
        ("acme", "search", "from-resource"), ("globex", "", "from-resource")]
    assert (outcome.metered, outcome.ignored, outcome.invalid) == (2, 4, 0)
    cycle = [json_span("0000000000000001", "a", {"meterline.tenant_id": "acme"}, parent="0000000000000002"),
             json_span("0000000000000002", "chat", CHAT, parent="0000000000000001")]
    [event], _ = run(json_request(cycle))  # a hostile payload's cycle ends the walk
    assert event.tenant_id == "acme"
    [event], _ = run(json_request(spans[3:4]), tenant="initech")  # no tenant in the payload: the token's
    assert event.tenant_id == "initech"
    hostile = json_request([json_span("0000000000000009", "chat", {**CHAT, "meterline.tenant_id": "a\u202eb"})],
                           {"meterline.tenant_id": "x" * 500})
    [event], outcome = run(hostile, tenant="initech")  # the payload's tenant is not even validated
    assert event.tenant_id == "initech" and outcome.invalid == 0
    events, outcome = run(hostile)  # without a tenant token it is, and refused
    assert events == [] and outcome.invalid == 1 and "tenant_id" in outcome.error_message
    [event], _ = run(json_request(spans[:4]), tenant="initech")  # an ancestor's tenant too
    assert (event.tenant_id, event.team) == ("initech", "search")


def test_non_genai_bodies_are_only_counted_and_nesting_passes_through_them():
    def plain(tracer):
        for _ in range(50):
            with tracer.start_as_current_span("GET /", attributes={"http.request.method": "GET"}):
                pass

    body = encode_spans(recorded_spans(plain)).SerializeToString()
    events, outcome = run(body, otlp.PROTOBUF)
    assert events == [] and outcome.ignored == 50

    def openinference(tracer):  # no gen_ai.* key at all: another dialect's prefixes
        with tracer.start_as_current_span("llm", attributes={"openinference.span.kind": "LLM", "llm.model_name": "gpt-4o",
                                                             "llm.provider": "openai", "llm.token_count.prompt": 10,
                                                             "llm.token_count.completion": 2, "meterline.tenant_id": "acme"}):
            pass

    [event], _ = run(encode_spans(recorded_spans(openinference)).SerializeToString(), otlp.PROTOBUF)
    assert (event.model, event.input_tokens, event.output_tokens) == ("gpt-4o", 10, 2)

    nesting = Nesting()
    child = json_span("00000000000000c1", "openai chat", {**CHAT, "meterline.tenant_id": "acme"}, parent="00000000000000b1",
                      end=1_700_000_001_000_000_000)
    middle = json_span("00000000000000b1", "retry", {"http.method": "POST"}, parent="00000000000000a1",
                       end=1_700_000_002_000_000_000)
    outer = json_span("00000000000000a1", "framework chat", {**CHAT, "meterline.tenant_id": "acme"}, end=1_700_000_003_000_000_000)
    assert len(run(json_request([child]), nesting=nesting)[0]) == 1
    assert run(json_request([middle]), nesting=nesting)[1].ignored == 1  # no GenAI key: settled, cover passed up
    events, outcome = run(json_request([outer]), nesting=nesting)
    assert events == [] and outcome.nested == 1
    # in one request, out of order: the end times decide
    events, outcome = run(json_request([outer, middle, child]))
    assert len(events) == 1 and events[0].attributes["span_id"] == "00000000000000c1" and outcome.nested == 1


def test_odd_values_reject_their_span_not_the_batch():
    odd_op = json_span("0000000000000002", "odd operation", {**CHAT, "meterline.tenant_id": "acme"})
    odd_op["attributes"][0] = {"key": "gen_ai.operation.name", "value": {"kvlistValue": {"values": [kv("a", "b")]}}}
    spans = [json_span("0000000000000001", "fine", {**CHAT, "meterline.tenant_id": "acme"}), odd_op,
             {**json_span("0000000000000003", "odd status", {**CHAT, "meterline.tenant_id": "acme"}), "status": "ERROR"},
             json_span("0000000000000004", "odd time", {**CHAT, "meterline.tenant_id": "acme"}, end="soon")]
    events, outcome = run(json_request(spans))  # no exception: the batch is answered
    sent = {e.attributes["span_id"] for e in events}
    assert "0000000000000001" in sent and not sent & {"0000000000000003", "0000000000000004"}
    assert outcome.invalid + len(events) == 4 and "'odd status'" in outcome.error_message
    assert "'odd time'" in outcome.error_message
