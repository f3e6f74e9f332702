"""The wire format of `priced`, measured before choosing (issue 17): CPU µs per record on both sides.

    METERLINE_KAFKA_BOOTSTRAP=127.0.0.1:9092 .venv/bin/python -m bench.wire [--events 50000] [--repeat 3]

Worker side: the priced encoding of the same usage events (the bench's, decoded and priced by the worker's
own code): v1 JSON (`StreamWorker._priced_json`) and priced.v2 (`_priced_v2`, RowBinary).
Sink side: staging one batch into the typed, checked `typed_priced_events` of a fresh embedded chDB, the step
the formats change (dedupe and the ledger insert are the same for all), for each candidate:

- v1: text JSONEachRow into the String staging table, then the typed fill with the checks (today);
- (a) JSONEachRow straight into a typed staging table (one parse), then the checks;
- (b) priced.v2: RowBinary rows as the worker wrote them (no parse), the framing check, then the checks;
- (c) Arrow built in the sink per batch from the v1 records (msgspec decode, columns, IPC), then the checks.

Then the whole sink in process (`_take_many` + `flush()`: checks, dedupe, ledger insert) over all-v1 and all-v2
batches. Clock: time.process_time() (every thread, chDB's included), best of --repeat. The broker is only
contacted by the worker's and the sink's constructors. Results: bench/results/wire.md.
"""
from __future__ import annotations

import argparse
import io
import os
import platform
import tempfile
import time
import uuid
from pathlib import Path

import msgspec

from meterline.schemas import events as ev
from meterline.settings import Settings

from .pipeline import make_events
from .profile import Msg

RESULTS = Path(__file__).with_name("results") / "wire.md"


def cpu_us(action, n: int, repeat: int) -> float:
    """Best CPU µs per item of `action()` over `repeat` runs."""
    best = float("inf")
    for _ in range(repeat):
        c0 = time.process_time()
        action()
        best = min(best, time.process_time() - c0)
    return best / n * 1e6


def priced_records(settings: Settings, n: int) -> tuple[object, list, list[bytes], list[bytes]]:
    """(worker, priced inputs, v1 records, v2 records) of n bench usage events, priced by the worker's code."""
    from meterline.streams.codec import decode_usage
    from meterline.streams.worker import NO_PARTS, StreamWorker

    worker = StreamWorker(settings, checkpoint_interval=3600, publish_interval=3600)
    inputs = []
    for _, raw in make_events(n, sessions=10_000):
        event = decode_usage(raw)
        listed = worker.catalog.price_pico(event)
        cost, source = (listed[4], "catalog") if listed else (0, "unpriced")
        inputs.append((event, cost, listed or NO_PARTS, source))
    now = ev.utcnow()
    v2 = [worker._priced_v2(e, c, p, s, now) for e, c, p, s in inputs]
    v1 = [worker._priced_json(e, c, p, s, now) for e, c, p, s in inputs]  # last: it sets cost_usd on the event
    return worker, inputs, v1, v2


def encode_costs(worker, inputs: list, repeat: int) -> dict[str, float]:
    now = ev.utcnow()
    v1, v2 = worker._priced_json, worker._priced_v2
    return {"v1": cpu_us(lambda: [v1(e, c, p, s, now) for e, c, p, s in inputs], len(inputs), repeat),
            "v2": cpu_us(lambda: [v2(e, c, p, s, now) for e, c, p, s in inputs], len(inputs), repeat)}


def stage_costs(settings: Settings, v1: list[bytes], v2: list[bytes], repeat: int) -> dict[str, float]:
    from meterline.sql import ledger
    from meterline.sql.sink import BINARY_TAIL, LedgerSink
    from meterline.sql.writer import STAGE_SETTINGS, json_line

    client = ledger.connect(settings)
    ledger.migrate(client)
    sink = LedgerSink(settings, client=client, group=f"w-{uuid.uuid4().hex[:6]}")
    staged, topic, nonce = sink.writer.staged("priced_events"), settings.topic("priced"), 7
    for statement in staged.create():
        client.command(statement)
    n = len(v1)
    json_lines = [json_line(r, Msg(topic, i % 12, i, None, r), 0) for i, r in enumerate(v1)]
    rows = [r[1:] + BINARY_TAIL(i % 12, i, 0, nonce) for i, r in enumerate(v2)]
    typed_json = staged.stage2.replace("stage2", "stagea")
    client.command(staged.binary_create().replace(staged.stage2, typed_json))
    fill_a = staged.binary_fill(topic).replace(staged.stage2, typed_json)

    def truncate() -> None:
        for statement in staged.truncate() + [f"TRUNCATE TABLE {typed_json}"]:
            client.command(statement)

    def run_v1() -> None:
        truncate()
        client.raw_insert(staged.stage, None, b"\n".join(json_lines), settings=STAGE_SETTINGS,
                          fmt="JSONEachRow")
        client.command(staged.fill())

    def run_a() -> None:
        truncate()
        client.raw_insert(typed_json, None, b"\n".join(json_lines), fmt="JSONEachRow",
                          settings={"input_format_skip_unknown_fields": 1, "date_time_input_format": "best_effort"})
        client.command(fill_a)

    def run_b() -> None:
        truncate()
        sink.writer.load_binary(staged, rows, nonce)

    def run_c() -> None:
        import pyarrow as pa

        truncate()
        names = [name for name, _ in ev.priced_v2_layout()]
        decoded = [msgspec.json.decode(r) for r in v1]
        columns = {name: [d.get(name) for d in decoded] for name in names}
        for name, kind in ev.priced_v2_layout():  # what Arrow needs typed: the text the JSON carries, converted
            if kind == "money":
                columns[name] = pa.array([ev.Decimal(x or 0) for x in columns[name]], pa.decimal128(38, 12))
            elif kind == "time":
                columns[name] = pa.array([ev.datetime.fromisoformat(x) for x in columns[name]], pa.timestamp("us", "UTC"))
            elif kind == "uuid":
                columns[name] = pa.array([uuid.UUID(x).bytes for x in columns[name]], pa.binary(16))
            elif kind == "map":
                columns[name] = pa.array([list(x.items()) for x in columns[name]], pa.map_(pa.string(), pa.string()))
        columns.update(_partition=[i % 12 for i in range(n)], _offset=list(range(n)), _batch_start=[0] * n, _nonce=[nonce] * n)
        table = pa.table(columns)
        sink_io = io.BytesIO()
        with pa.ipc.new_stream(sink_io, table.schema) as writer:
            writer.write_table(table)
        client.raw_insert(staged.stage2, None, sink_io.getvalue(), fmt="ArrowStream")
        client.command(staged.binary_fill(topic))

    out = {}
    for name, action in (("v1", run_v1), ("a", run_a), ("b", run_b), ("c", run_c)):
        try:
            out[name] = cpu_us(action, n, repeat)
            out[name + " rows"] = client.query(f"SELECT countIf(_ok) FROM {staged.typed}").result_rows[0][0]
        except Exception as err:  # noqa: BLE001 - a candidate that does not run is reported, not fatal
            out[name] = float("nan")
            out[name + " rows"] = f"failed: {str(err).splitlines()[0][:120]}"
    sink.consumer.close()
    return out


def sink_costs(settings: Settings, records: dict[str, list[bytes]], repeat: int) -> dict[str, float]:
    """The whole sink in process (intake + flush into a fresh ledger) per format, best of `repeat`."""
    from meterline.sql import ledger
    from meterline.sql.sink import LedgerSink

    out = {}
    for name, values in records.items():
        best = float("inf")
        for _ in range(repeat):
            client = ledger.connect(settings, database=f"w{uuid.uuid4().hex[:8]}")
            ledger.migrate(client)
            sink = LedgerSink(settings, client=client, group=f"w-{uuid.uuid4().hex[:6]}")
            topic = settings.topic("priced")
            msgs = [Msg(topic, i % 12, i // 12, None, v) for i, v in enumerate(values)]
            c0 = time.process_time()
            for i in range(0, len(msgs), 10_000):
                sink._take_many(msgs[i:i + 10_000])
            sink.flush()
            best = min(best, time.process_time() - c0)
            stored = client.query("SELECT count() FROM priced_events").result_rows[0][0]
            sink.consumer.close()
            if stored != len(values):
                raise SystemExit(f"{name}: the ledger holds {stored} of {len(values)} rows")
        out[name] = best / len(values) * 1e6
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--events", type=int, default=50_000)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    data = Path(tempfile.mkdtemp(prefix="bench-wire-"))
    settings = Settings(kafka_bootstrap=os.environ.get("METERLINE_KAFKA_BOOTSTRAP", "127.0.0.1:9092"),
                        topic_prefix=f"wire{uuid.uuid4().hex[:6]}", data_dir=data, clickhouse_dsn=f"chdb://{data / 'ch'}")
    worker, inputs, v1, v2 = priced_records(settings, args.events)
    encode = encode_costs(worker, inputs, args.repeat)
    worker.consumer.close()
    stage = stage_costs(settings, v1, v2, args.repeat)
    whole = sink_costs(settings, {"v1": v1, "v2": v2}, args.repeat)
    load = os.getloadavg()[0]
    text = f"""## priced wire format: CPU µs per record (best of {args.repeat})

`python -m bench.wire --events {args.events} --repeat {args.repeat}` on {platform.machine()}, {os.cpu_count()} cores,
Python {platform.python_version()}, embedded chDB; load average {load:.1f}. Record size: v1 {sum(map(len, v1)) / len(v1):.0f} B,
v2 {sum(map(len, v2)) / len(v2):.0f} B.

| candidate | worker encode µs | sink staging + checks µs | rows accepted |
|---|---:|---:|---:|
| v1 JSON, text staging + typed fill (today) | {encode['v1']:.2f} | {stage['v1']:.2f} | {stage['v1 rows']} |
| (a) JSON into a typed staging table | {encode['v1']:.2f} | {stage['a']:.2f} | {stage['a rows']} |
| (b) priced.v2 RowBinary from the worker | {encode['v2']:.2f} | {stage['b']:.2f} | {stage['b rows']} |
| (c) Arrow built in the sink from v1 | {encode['v1']:.2f} | {stage['c']:.2f} | {stage['c rows']} |

Whole sink in process (intake + checks + dedupe + ledger insert): v1 **{whole['v1']:.2f} µs/row**
({1e6 / whole['v1']:,.0f} rows/s of CPU), v2 **{whole['v2']:.2f} µs/row** ({1e6 / whole['v2']:,.0f} rows/s).
"""
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
