"""What the bench scripts share: their --help, --code (a baseline checkout measured in the same run), the
machine and command lines written beside each figure, the local broker they measure, the results file a
section is appended to, and the worker's stages timed alone (bench.worker_stages, bench.compiled).

Standard library at the top (meterline is imported where it is needed): tests load bench scripts by path."""
from __future__ import annotations

import argparse
import gc
import importlib
import os
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path

RESULTS_DIR = Path(__file__).with_name("results")

# Every bare-consume baseline's consumer: librdkafka pauses a partition's fetches for fetch.queue.backoff.ms
# (1000 by default) once its local queue is full (queued.max.messages.kbytes, 64 MiB). A bare consumer drains a
# backlog faster than that, so 300k events stood still for 0.9 of a 1.2 s read: ~250k/s where it reads ~1.2M/s
# without the pause (2026-12-04). Every baseline measured before then is the paused one.
BARE_CONSUMER = {"fetch.queue.backoff.ms": 10}


def parser(doc: str) -> argparse.ArgumentParser:
    """The script's options; --help prints its docstring whole (how to run it, what each step measures)."""
    first, _, rest = doc.strip().partition("\n")
    return argparse.ArgumentParser(description=first, epilog=rest.strip("\n") or None,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)


def code_option(parser: argparse.ArgumentParser, package: str) -> None:
    """--code DIR: measure another checkout's meterline.<package> (a baseline) in the same run as this tree's."""
    parser.add_argument("--code", metavar="DIR", help=f"load meterline.{package} from DIR/{package} (e.g. "
                        f"`git archive <commit> {package} | tar -x -C DIR`) instead of this tree, for a before/after")


def load_code(package: str, directory: str | None) -> None:
    """Point meterline.<package> at DIR/<package> (--code); call it before any of the package's modules is imported."""
    if directory:
        importlib.import_module(f"meterline.{package}").__path__[:] = [str(Path(directory) / package)]


def bootstrap() -> str:
    """The brokers measured: METERLINE_KAFKA_BOOTSTRAP, else the local default."""
    return os.environ.get("METERLINE_KAFKA_BOOTSTRAP", "127.0.0.1:9092")


def command(module: str, *args: str) -> str:
    """The command line that reproduces a figure, as a reader reruns it."""
    return " ".join([f"METERLINE_KAFKA_BOOTSTRAP={bootstrap()}", ".venv/bin/python", "-m", f"bench.{module}", *args])


def machine(cores_note: str = "") -> str:
    """One line for the section: architecture, cores, Python and the load the run shared the machine with."""
    return (f"Machine: `{platform.machine()}`, {os.cpu_count()} cores{cores_note}, Python {platform.python_version()}, "
            f"load average {os.getloadavg()[0]:.2f}.")


def utc_stamp() -> str:
    return time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())


def broker_pid() -> int | None:
    """The local broker that `meterline kafka start` runs (None when it runs elsewhere)."""
    from meterline.settings import Settings

    try:
        return int((Settings().data_dir / "kafka" / "broker.pid").read_text())
    except (OSError, ValueError):
        return None


def require_local_broker(alternative: str) -> None:
    """Exit in one line when no local broker can be measured (its CPU would read 0)."""
    if broker_pid() is None:
        from meterline.settings import Settings

        sys.exit(f"error: no local broker under {Settings().data_dir / 'kafka'}: start one (`meterline kafka start`), "
                 f"set METERLINE_DATA_DIR to the one running, or {alternative}")


def append_result(name: str, text: str, title: str) -> Path:
    """Append a section to bench/results/<name>.md (a new file starts with `# title`)."""
    path = RESULTS_DIR / f"{name}.md"
    path.parent.mkdir(parents=True, exist_ok=True)
    previous = path.read_text() if path.exists() else f"# {title}\n"
    path.write_text(previous.rstrip() + "\n\n" + text.strip("\n") + "\n")
    return path


# The worker's in-process stages, in process()'s order: name -> what the results call it.
STAGES = {"decode": "decode + validate", "digest": "dedupe digest", "price": "price", "priced_v2": "priced.v2 encode",
          "detectors": "detectors", "spend": "spend add_many"}


def worker_stages(package: str, values: list[bytes]) -> dict[str, Callable[[], None]]:
    """Each of STAGES as a function that runs it once over every usage value, fresh state each run, with the
    package's code (meterline.streams, or a baseline loaded under another name); what a stage takes (events,
    prices, rows) is made here, once, outside it."""
    from datetime import datetime, timezone

    from meterline.schemas.events import MAX_FUTURE_SKEW

    mod = {name: importlib.import_module(f"{package}.{name}")
           for name in ("anomalies", "codec", "pricing", "spend", "worker")}
    catalog, now = mod["pricing"].load_catalog(), datetime.now(timezone.utc)
    latest, decode = now + MAX_FUTURE_SKEW, mod["codec"].decode_usage
    events = [decode(v, latest=latest) for v in values]
    rows = []
    for e in events:
        listed = catalog.price_pico(e)
        second = mod["anomalies"].second_of(e.ts)  # the integer second the worker hands the detectors
        rows.append((e, listed[4] if listed else 0, listed or (0,) * 5, second, listed is None))
    batch = [((e.tenant_id, e.team, e.project, e.agent_id, e.session_id), second // 60, cost, e.input_tokens,
              e.output_tokens, unpriced) for e, cost, _, second, unpriced in rows]

    def decode_all() -> None:
        for v in values:
            decode(v, latest=latest)

    def digest() -> None:
        usage_digest = mod["worker"].usage_digest
        for e in events:
            usage_digest(e)

    def price() -> None:
        price_pico = catalog.price_pico
        for e in events:
            price_pico(e)

    def priced_v2() -> None:
        write = mod["codec"].PricedV2Writer().write  # a fresh writer: its string cache fills as in a worker
        for e, cost, parts, _, unpriced in rows:
            write(e, cost, parts, "unpriced" if unpriced else "catalog", catalog.version, now)

    def detectors() -> None:
        usage = mod["anomalies"].Detectors().usage
        for e, cost, _, second, unpriced in rows:
            usage(e, cost, unpriced, second)

    def spend() -> None:
        book = mod["spend"].SpendBook()  # no store: a fresh one is empty, so add_many never reads it
        for i in range(0, len(batch), 5000):  # the worker's batches
            book.add_many(batch[i:i + 5000])

    return dict(zip(STAGES, (decode_all, digest, price, priced_v2, detectors, spend)))


def cpu_us_per_event(fn: Callable[[], None], n: int) -> float:
    """CPU µs per event of one run of fn() (process_time: every thread), garbage collected first."""
    gc.collect()
    c0 = time.process_time()
    fn()
    return (time.process_time() - c0) / n * 1e6
