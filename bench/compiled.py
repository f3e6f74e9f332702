"""Does compiling the worker's hot modules buy issue 17's 3x? Pure CPython vs the same source compiled by Cython or mypyc.

    METERLINE_KAFKA_BOOTSTRAP=127.0.0.1:9092 .venv/bin/python -m bench.compiled [--events 100000] [--rounds 3]
        [--variants pure,cython] [--build /tmp/meterline-compiled]

Needs Cython and mypy (`pip install cython mypy`) and a C compiler; an experiment: nothing here ships compiled.

- build: copies this tree's streams/ into BUILD/<variant>/meterline/streams (never next to the sources, where a .so
  would shadow the .py for everyone). `pure` stays as is; `cython` compiles the hot modules (HOT) with Cython 3 as
  plain Python (annotations ignored); `cython-pxd` also puts bench/compiled_pxd/*.pxd (ScopeSpend as an extension
  type, typed locals in the spend loops) beside them; `mypyc-spend` compiles spend.py alone with mypyc, after the
  few changes (MYPYC_SPEND) it needs in the copy (the other hot modules do not type-check).
- measure: per round, one fresh process per variant (the order alternates between rounds), which points
  meterline.streams.__path__ at its copy and measures, from the same prebuilt messages:
  - worker: StreamWorker.process() + publish + producer flush over the bench's events (bench.profile.worker_cost,
    fake Messages, the producer sending to a fresh topic prefix on the real broker), best of --repeat;
  - stages: each hot call alone over every event, in process()'s order (decode + validate, dedupe digest, price,
    priced.v2 encode, detectors, spend add_many per 5,000 rows), fresh state each, best of --repeat (the stages of
    bench.worker_stages: bench.common.worker_stages). cProfile cannot see into compiled functions, so this replaces
    bench.profile's --cprofile breakdown for both.
  CPU is time.process_time() (every thread of the process: librdkafka's included).
- --callgrind N: instead, the stages' instructions per event under valgrind (no broker, deterministic: this shared
  machine's load does not move it).
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import zlib
from pathlib import Path

from bench.common import (STAGES as STAGE_NAMES, append_result, command, cpu_us_per_event, machine, parser, utc_stamp,
                          worker_stages)

SRC = Path(__file__).resolve().parent.parent / "streams"
PXD = Path(__file__).with_name("compiled_pxd")
HOT = ("spend", "pricing", "anomalies", "codec", "worker")
STAGES = tuple(STAGE_NAMES.values())  # the report's columns, in the order stage_costs gives them


# what mypyc needs changed in spend.py before it compiles and runs it right (applied to the copy only): mypy errors
# in the other hot modules (~70, FastUsage is a runtime-made type) keep them out of mypyc; see BENCHMARKS.md
MYPYC_SPEND = (
    ("        key = minute if type(minute) is int else minute_key(minute)\n",  # mypy does not narrow type(x) is int
     "        key = minute if type(minute) is int else minute_key(minute)  # type: ignore[arg-type]\n"),
    ("level, late = self.chains, self._chain, {}, 0\n", "level, late = self.chains, self._chain, {}, 0  # type: ignore[var-annotated]\n"),
    ("        tenant, states, up = ids[0], self.states, ()\n",  # `up` inferred as tuple[()], a fixed (unboxed) tuple
     "        tenant, states = ids[0], self.states\n        up: tuple[ScopeSpend, ...] = ()\n"),
    ("Month = tuple[datetime, datetime, int, int]", "Month = tuple"),  # unboxed, a month is a new tuple each time: add_many's `is` fails
    *((f"    {name} = property(lambda self: {expr})\n", f"    @property\n    def {name}(self) -> Any: return {expr}\n")  # a KeyError in mypyc
      for name, expr in (("window_start", "_minute(self.window_key)"), ("period_start", "self.month[0]"),
                         ("period_end", "self.month[1]"), ("period_start_key", "self.month[2]"), ("period_end_key", "self.month[3]"))),
    ("    last_ts = window_start\n", "    @property\n    def last_ts(self) -> Any: return _minute(self.window_key)\n"),
)


def build(root: Path, variant: str) -> Path:
    """BUILD/<variant>: a package tree whose meterline/streams is this tree's streams/, its hot modules compiled."""
    out = root / variant
    shutil.rmtree(out, ignore_errors=True)
    pkg = out / "meterline" / "streams"
    shutil.copytree(SRC, pkg, ignore=shutil.ignore_patterns("__pycache__", "*.so", "*.c"))
    (out / "meterline" / "__init__.py").touch()  # so the compilers name the modules meterline.streams.*
    quiet = {"cwd": out, "check": True, "stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL}
    if variant == "mypyc-spend":
        text = (pkg / "spend.py").read_text()
        for old, new in MYPYC_SPEND:
            assert old in text, f"spend.py changed: {old!r} not found (update MYPYC_SPEND)"
            text = text.replace(old, new)
        (pkg / "spend.py").write_text(text)
        subprocess.run([str(Path(sys.executable).with_name("mypyc")), "--follow-imports=silent", "--ignore-missing-imports",
                        "meterline/streams/spend.py"], **quiet)
    elif variant != "pure":
        if variant == "cython-pxd":
            for pxd in PXD.glob("*.pxd"):
                shutil.copy(pxd, pkg)
        # annotation_typing off: Cython would enforce annotations strictly (`contract: type` refuses pydantic's metaclass)
        subprocess.run([str(Path(sys.executable).with_name("cythonize")), "-3", "-X", "annotation_typing=False", "-i",
                        "-j", str(os.cpu_count() or 1), "-q", *(f"meterline/streams/{m}.py" for m in HOT)], **quiet)
    return out


def messages(events: int, sessions: int, topic: str) -> list:
    from bench.fake_kafka import Message
    from bench.pipeline import make_events

    # partition as a stable hash of the key (the tenant), like the producer's partitioner: 12 usage partitions
    return [Message(topic, zlib.crc32(key) % 12, i, key, value) for i, (key, value) in enumerate(make_events(events, sessions))]


def stage_costs(msgs: list) -> list[float]:
    """µs per event of each hot call alone, over every message, in process()'s order (fresh state each)."""
    stages = worker_stages("meterline.streams", [m.value() for m in msgs])
    return [cpu_us_per_event(run, len(msgs)) for run in stages.values()]


def load(tree: str) -> list[str]:
    """Point meterline.streams at BUILD/<variant> (before anything imports it); its compiled hot modules."""
    import importlib

    import meterline.streams

    meterline.streams.__path__[:] = [str(Path(tree) / "meterline" / "streams")]
    files = [importlib.import_module(f"meterline.streams.{m}").__file__ for m in HOT]
    assert all(f.startswith(tree) for f in files), files  # not this tree's (the editable install's finder)
    return [m for m, f in zip(HOT, files) if f.endswith(".so")]


def child(tree: str, events: int, sessions: int, repeat: int) -> None:
    """One variant in this process: prints {"compiled": [...], "worker": [µs...], "stages": [[µs...]...]}."""
    import uuid

    compiled = load(tree)
    from meterline.settings import Settings
    from meterline.topics import create_topics

    from bench.profile import worker_cost

    settings = Settings(topic_prefix=f"cmp{uuid.uuid4().hex[:8]}")
    create_topics(settings)
    msgs = messages(events, sessions, settings.topic("usage"))
    workers = [worker_cost(settings, msgs, profile=False)[0] for _ in range(repeat)]
    stages = [stage_costs(msgs) for _ in range(repeat)]
    print(json.dumps({"compiled": compiled, "worker": workers, "stages": stages}))


def stages_only(tree: str, events: int, measure: bool = True) -> None:
    """The stages' inputs built from `events` messages, then (measure) each stage run once."""
    load(tree)
    stages = worker_stages("meterline.streams", [m.value() for m in messages(events, max(events // 10, 1), "usage")])
    if measure:
        for run in stages.values():
            run()


def callgrind(tree: Path, events: int, measure: bool) -> int:
    """Instructions of one stages_only() process, as callgrind counts them."""
    out = subprocess.run(["valgrind", "--tool=callgrind", "--callgrind-out-file=/dev/null", sys.executable, "-c",
                          f"from bench.compiled import stages_only; stages_only({str(tree)!r}, {events}, {measure})"],
                         capture_output=True, text=True, check=True, cwd=SRC.parent,
                         env={**os.environ, "PYTHONPATH": str(SRC.parent), "PYTHONHASHSEED": "0"})
    return int(re.search(r"Collected : (\d+)", out.stderr).group(1))


def instructions(trees: dict[str, Path], events: int) -> dict[str, float]:
    """Instructions per event of the stages alone (no broker), per variant: the difference between processes of
    2 x `events` and `events` messages (start-up and imports cancel), less the same difference for processes that
    only build the messages and the stages' inputs (decoded and priced once, with the variant's own code).
    Deterministic: the machine's load does not move it."""
    from concurrent.futures import ThreadPoolExecutor

    jobs = [(v, n, measure) for v in trees for n in (events, 2 * events) for measure in (True, False)]
    with ThreadPoolExecutor(os.cpu_count()) as pool:  # callgrind counts the same run in parallel or not
        counts = dict(zip(jobs, pool.map(lambda job: callgrind(trees[job[0]], *job[1:]), jobs)))
    grown = {(v, measure): counts[(v, 2 * events, measure)] - counts[(v, events, measure)] for v, _, measure in jobs}
    return {v: (grown[(v, True)] - grown[(v, False)]) / events for v in trees}


def run_child(tree: Path, args) -> dict:
    code = f"from bench.compiled import child; child({str(tree)!r}, {args.events}, {args.sessions}, {args.repeat})"
    load = os.getloadavg()[0]
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=SRC.parent, env={**os.environ, "PYTHONPATH": str(SRC.parent)})
    return {**json.loads(out.stdout.strip().splitlines()[-1]), "load": load}


def report(args, results: list[tuple[int, str, dict]]) -> str:
    base = [min(r["worker"]) for _, v, r in results if v == "pure"]
    lines = [f"## Compiled hot modules vs pure CPython ({utc_stamp()})", "", machine(),
             f"Command: `{command('compiled', '--events', str(args.events), '--rounds', str(args.rounds), '--variants', args.variants)}`. "
             f"Cython compiles {', '.join(HOT)} (Cython {version('Cython')}, mypy {version('mypy')}). Ratio = the round's pure worker / this worker.", "",
             "| round | variant | load | worker µs/event (best of) | " + " | ".join(STAGES) + " | loop and rest | ratio |",
             "|---:|---|---:|---:|" + "---:|" * (len(STAGES) + 2)]
    for rnd, variant, r in results:
        worker = min(r["worker"])
        stages = [min(s[i] for s in r["stages"]) for i in range(len(STAGES))]
        pure = next(min(p["worker"]) for q, v, p in results if q == rnd and v == "pure")
        lines.append(f"| {rnd} | {variant} | {r['load']:.1f} | **{worker:.2f}** ({', '.join(f'{w:.2f}' for w in r['worker'])}) | "
                     + " | ".join(f"{s:.2f}" for s in stages) + f" | {worker - sum(stages):.2f} | {pure / worker:.2f} |")
    for variant in dict.fromkeys(v for _, v, _ in results):
        mean = sum(min(r["worker"]) for _, v, r in results if v == variant) / args.rounds
        lines.append(f"\nMean worker µs/event, {variant}: {mean:.2f} (pure {sum(base) / len(base):.2f}: ratio "
                     f"{sum(base) / len(base) / mean:.2f})")
    return "\n".join(lines) + "\n"


def version(package: str) -> str:
    from importlib.metadata import PackageNotFoundError, version as of

    try:
        return of(package)
    except PackageNotFoundError:
        return "not installed"


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--events", type=int, default=100_000)
    p.add_argument("--sessions", type=int, default=10_000)
    p.add_argument("--rounds", type=int, default=3, help="alternations of every variant (fresh process each)")
    p.add_argument("--repeat", type=int, default=3, help="fresh workers / stage passes per process (best of)")
    p.add_argument("--variants", default="pure,cython", help="of pure, cython, cython-pxd, mypyc-spend")
    p.add_argument("--callgrind", type=int, metavar="N", help="instead: instructions per event of the stages alone, "
                   "callgrind over N and 2N events per variant (no broker; slow: ~50x)")
    p.add_argument("--build", default="/tmp/meterline-compiled", help="where the copies are built (not this tree)")
    args = p.parse_args()
    variants = args.variants.split(",")
    root = Path(args.build)
    trees = {v: build(root, v) for v in variants}
    if args.callgrind:
        per_event = instructions(trees, args.callgrind)
        text = (f"## Compiled hot modules: instructions per event of the stages alone ({utc_stamp()})\n\n{machine()}\n"
                f"Command: `.venv/bin/python -m bench.compiled --callgrind {args.callgrind} --variants {args.variants}`\n\n"
                "| variant | instructions per event (decode ... spend add_many) | ratio to pure |\n|---|---:|---:|\n"
                + "".join(f"| {v} | {n:,.0f} | {per_event.get('pure', n) / n:.2f} |\n" for v, n in per_event.items()))
        print(text)
        print("appended to", append_result("compiled", text, "Compiled hot modules (bench/compiled.py)"))
        return
    results = []
    for rnd in range(1, args.rounds + 1):
        for v in variants if rnd % 2 else variants[::-1]:
            results.append((rnd, v, run_child(trees[v], args)))
            print(rnd, v, results[-1], flush=True)
    text = report(args, results)
    print(text)
    print("appended to", append_result("compiled", text, "Compiled hot modules (bench/compiled.py)"))


if __name__ == "__main__":
    main()
