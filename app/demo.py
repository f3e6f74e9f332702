"""`meterline demo`: the whole pipeline with a SIMULATED fleet of agents, live in the terminal.

The fleet (every number below is simulated, reproducible with --seed):

* five tenants with hourly budgets published through the allocator's budget API:
  acme (spends faster than its pace allows, so low-priority work is throttled), globex
  (hard and comfortable), initech (its runaway agent burns through the budget), umbrella
  (small: runs out first) and hooli (small and hard: denied once spent). Once a soft budget
  is used up, `high` agents are downgraded to a cheaper model, `normal` ones queued,
  low/batch throttled, `critical` keeps running;
* a priority mix (critical … batch) across agents that call real model names, priced by
  the catalog, plus tool calls and one self-hosted model nobody can price;
* a runaway agent at initech that loops on the same call (after a normal recent history);
* a simulated GPU node (`meterline collect gpu --simulate`) whose processes belong to
  acme and globex sessions;
* REAL CPU and memory (not simulated): five agents each run a tool worker process (a browser, a
  local model, a code interpreter, ...) that burns a set share of a core and holds a set amount of
  memory; `meterline collect node --pid ...` measures those processes from /proc and attributes
  them by the session in their environment (METERLINE_*), as on any node.

Every agent checks its allocator guard before each call and obeys: throttled calls back
off, downgraded calls use the model they are told to, denied calls stop. The demo ends
with a chargeback table from the ledger, checked against the ledger's own total.

Each run has a namespace of its own (`demo_settings`): topics `demo-<run>.*` and a fresh embedded ledger in
<data dir>/demo, whatever METERLINE_CLICKHOUSE_DSN names, so simulated tenants never reach a real ledger and a
rerun never mixes with the run before (the previous runs' demo topics are deleted).
"""
from __future__ import annotations

import json
import logging
import random
import shutil
import signal
import threading
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from decimal import Decimal
from typing import Annotated, Any, Optional

import typer

log = logging.getLogger("meterline.demo")
BANNER = "SIMULATED DATA — a synthetic fleet, not real usage"


@dataclass
class AgentSpec:
    tenant: str
    team: str
    project: str
    agent: str
    priority: str
    provider: str
    model: str
    calls_per_s: float
    input_tokens: int
    output_tokens: int
    cache_ratio: float = 0.3
    tool: str = ""
    runaway: bool = False


FLEET: tuple[AgentSpec, ...] = (
    AgentSpec("acme", "research", "rag", "planner", "high", "anthropic", "claude-sonnet-4", 3, 6000, 900),
    AgentSpec("acme", "research", "rag", "retriever", "normal", "openai", "gpt-4o", 4, 4000, 400, tool="web_search"),
    AgentSpec("acme", "support", "triage", "classifier", "low", "openai", "gpt-4o", 4, 3000, 200),
    AgentSpec("acme", "ops", "nightly", "reindexer", "batch", "openai", "gpt-4o", 4, 8000, 300),
    AgentSpec("globex", "ml", "eval", "judge", "normal", "openai", "gpt-4o-mini", 4, 3000, 300),
    AgentSpec("globex", "ml", "finetune", "trainer", "batch", "self-hosted", "globex-llama-70b-ft", 1, 2000, 500),
    AgentSpec("initech", "research", "agents", "coder", "high", "anthropic", "claude-sonnet-4", 2, 5000, 1200),
    AgentSpec("initech", "research", "agents", "looper", "normal", "openai", "gpt-4o", 25, 3000, 600, runaway=True),
    AgentSpec("umbrella", "product", "chat", "assistant", "high", "openai", "gpt-4o", 3, 5000, 800),
    AgentSpec("umbrella", "product", "chat", "summarizer", "normal", "openai", "gpt-4o", 4, 6000, 600),
    AgentSpec("umbrella", "ops", "alerts", "pager", "critical", "openai", "gpt-4o-mini", 2, 1500, 200),
    AgentSpec("umbrella", "ops", "backfill", "backfiller", "batch", "openai", "gpt-4o", 4, 9000, 300),
    AgentSpec("hooli", "platform", "etl", "extractor", "normal", "openai", "gpt-4o", 4, 6000, 600),
    AgentSpec("hooli", "platform", "etl", "backfiller", "batch", "openai", "gpt-4o", 4, 9000, 300),
    AgentSpec("hooli", "platform", "etl", "tagger", "low", "openai", "gpt-4o-mini", 3, 2000, 200),  # ~20x cheaper calls
)


def session_of(spec: AgentSpec, seed: int) -> str:
    """The session an agent (seeded `seed`) runs in: its calls and its tool worker's CPU share it."""
    return f"{spec.agent}-{seed % 10_000:04d}"


@dataclass(frozen=True)
class DemoBudget:
    amount: Decimal
    hard: bool
    actions: dict[str, str]  # what each priority class gets once the budget is used up
    per_run: bool = False  # its period is the demo's run (paced over it) instead of an hour
    slo: dict[str, Any] | None = None  # objectives a downgrade must keep (`meterline report slo` measures them)


STRICT = {"critical": "allow", "high": "downgrade", "normal": "deny", "low": "deny", "batch": "deny"}
LENIENT = {"critical": "allow", "high": "downgrade", "normal": "queue", "low": "throttle", "batch": "deny"}
# Hard budgets hand out per-session spend leases and deny once used up; soft ones throttle,
# queue and downgrade but never deny.
BUDGETS: dict[str, DemoBudget] = {
    "acme": DemoBudget(Decimal("20"), False, STRICT,         # spends faster than its pace: low/batch (then normal) throttled
                       slo={"p95_latency_ms": 2500, "success_rate_pct": Decimal("95"), "cost_per_success_usd": Decimal("0.05")}),
    "globex": DemoBudget(Decimal("500"), True, STRICT),      # hard and comfortable: spend leases, no overshoot
    "initech": DemoBudget(Decimal("8"), False, LENIENT),     # the runaway burns it: high downgraded, normal queued
    "umbrella": DemoBudget(Decimal("0.15"), False, LENIENT), # small: runs out first; high downgraded, critical keeps running
    "hooli": DemoBudget(Decimal("0.10"), True, STRICT, per_run=True),  # small and hard, for this run: leases use it up, then deny
}


@dataclass
class Outcomes:
    """What the agents saw, per tenant: calls made, throttled, downgraded, denied."""

    counts: dict[str, Counter] = field(default_factory=lambda: defaultdict(Counter))
    sent: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, tenant: str, what: str, n: int = 1) -> None:
        with self.lock:
            self.counts[tenant][what] += n
            if what in ("ok", "downgraded", "history"):
                self.sent += n


class Agent(threading.Thread):
    """One simulated agent: guard.check → (obey) → meter.record → guard.record, in a loop."""

    def __init__(self, spec: AgentSpec, settings: Any, feed: Any, catalog: Any, outcomes: Outcomes, stop: threading.Event,
                 seed: int):
        super().__init__(name=f"agent-{spec.tenant}-{spec.agent}", daemon=True)
        from meterline.allocator.guard import Guard
        from meterline.collectors.sdk import Meter

        self.spec, self.catalog, self.outcomes, self.stop_event = spec, catalog, outcomes, stop
        self.random = random.Random(seed)
        session = session_of(spec, seed)
        self.meter = Meter(settings, tenant_id=spec.tenant, team=spec.team, project=spec.project, agent_id=spec.agent,
                           session_id=session, priority=spec.priority, register_pid=False)
        self.guard = Guard(feed, spec.tenant, spec.team, spec.project, spec.agent, session, priority=spec.priority,
                           fail_mode="open", queue_timeout=2.0, lease_timeout=2.0)

    def run(self) -> None:
        from meterline.allocator.guard import AllocatorUnavailable, BudgetExceeded, Throttled

        s, r = self.spec, self.random
        pause = 1.0 / s.calls_per_s
        while not self.stop_event.is_set():
            tokens_in = s.input_tokens if s.runaway else max(100, int(r.gauss(s.input_tokens, s.input_tokens / 4)))
            tokens_out = s.output_tokens if s.runaway else max(10, int(r.gauss(s.output_tokens, s.output_tokens / 4)))
            estimate = self._price(s.model, tokens_in, tokens_out)
            asked = time.monotonic()
            try:  # waits (briefly) for a token, a queue slot or a spend lease, as the allocator says
                model = self.guard.check(s.model, cost_usd=estimate, wait=True) or s.model
            except Throttled as err:
                self.outcomes.add(s.tenant, "throttled")
                self.stop_event.wait(min(2.0, max(pause, err.retry_after)))
                continue
            except BudgetExceeded as err:
                denied = str(err).startswith(("deny", "preempt"))
                self.outcomes.add(s.tenant, "denied" if denied else "throttled")
                self.stop_event.wait(1.0)  # wait for the next decision instead of calling
                continue
            except AllocatorUnavailable:
                self.outcomes.add(s.tenant, "denied")
                self.stop_event.wait(1.0)
                continue
            if time.monotonic() - asked > 0.05:
                self.outcomes.add(s.tenant, "throttled")  # the guard held the call back
            cached = int(tokens_in * s.cache_ratio)
            self.meter.record_llm(s.provider, model, input_tokens=tokens_in, output_tokens=tokens_out,
                                  cache_read_tokens=cached, latency_ms=int(r.uniform(200, 2500)),
                                  status="ok" if r.random() > 0.04 else "error")
            self.guard.record(self._price(model, tokens_in, tokens_out, cached), reserved_usd=estimate)
            self.outcomes.add(s.tenant, "downgraded" if model != s.model else "ok")
            if s.tool and r.random() < 0.3:
                self.meter.record_tool(s.tool, latency_ms=int(r.uniform(100, 900)), units=1)
                self.outcomes.add(s.tenant, "ok")
            self.stop_event.wait(pause * r.uniform(0.7, 1.3))
        self.meter.flush(30)
        self.meter.close()

    def _price(self, model: str, tokens_in: int, tokens_out: int, cached: int = 0) -> Decimal:
        from meterline.schemas.events import UsageEvent, new_id, utcnow

        event = UsageEvent(event_id=new_id(), ts=utcnow(), tenant_id=self.spec.tenant, kind="llm_call",
                           provider=self.spec.provider, model=model, input_tokens=tokens_in, output_tokens=tokens_out,
                           cache_read_tokens=cached)
        return self.catalog.price_usage(event).cost_usd


def send_history(settings: Any, seed: int, outcomes: Outcomes) -> None:
    """The last half hour of the runaway agent's normal sessions, so anomaly baselines know 'normal'."""
    from meterline.collectors.sdk import Meter
    from meterline.schemas.events import UsageEvent, new_id

    r = random.Random(seed)
    spec = next(s for s in FLEET if s.runaway)
    meter = Meter(settings, tenant_id=spec.tenant, team=spec.team, project=spec.project, agent_id=spec.agent,
                  session_id="history", register_pid=False)
    now = datetime.now(timezone.utc)
    n = 0
    for minute in range(30, 0, -1):
        for k in range(3):  # three short, ordinary sessions a minute
            session = f"{spec.agent}-hist-{minute:02d}-{k}"
            for call in range(r.randint(1, 3)):
                ts = now - timedelta(minutes=minute) + timedelta(seconds=k * 15 + call * 3)
                meter.send(UsageEvent(event_id=new_id(), ts=ts, tenant_id=spec.tenant, team=spec.team, project=spec.project,
                                      agent_id=spec.agent, session_id=session, kind="llm_call", provider=spec.provider,
                                      model=spec.model, input_tokens=r.randint(800, 3000), output_tokens=r.randint(50, 400),
                                      priority=spec.priority))
                n += 1
    meter.flush(30)
    meter.close()
    outcomes.add(spec.tenant, "history", n)


def publish_gpu_holders(settings: Any, start: datetime) -> None:
    """The simulated node's idle H100 is umbrella's (a reserved GPU nobody uses): its idle time lands on
    umbrella's bill under the `owner` and `proportional` policies, on the `idle` line under `separate`."""
    from meterline.collectors.cli import publish_allocations
    from meterline.schemas.events import GpuAllocation

    publish_allocations(settings, [GpuAllocation(allocation_id="demo-sim-node-1-idle-h100", node="sim-node-1",
                                                 gpu_uuid="GPU-5im1-0000-h100-idle", tenant_id="umbrella",
                                                 team="research", valid_from=start - timedelta(hours=1))])


def publish_budgets(settings: Any, start: datetime, duration: float = 3600, *, per_run: bool = False) -> dict[str, int]:
    """The hourly budgets from `start` (the minute the demo began), or (`per_run`) the ones whose period is
    the run: from `start` until `duration` from now and a margin, published just before the agents start
    (a period measured from an earlier moment ended before a slowly started run did).
    Returns each published tenant's period in seconds."""
    from meterline.allocator.budgets import publish_policy
    from meterline.schemas.events import BudgetPolicy

    seconds = int((datetime.now(timezone.utc) - start).total_seconds() + duration) + 10 if per_run else 3600
    periods = {tenant: seconds for tenant, budget in BUDGETS.items() if budget.per_run == per_run}
    for tenant, period in periods.items():
        budget = BUDGETS[tenant]
        publish_policy(settings, BudgetPolicy(
            policy_id=f"demo-{tenant}-hourly", tenant_id=tenant, scope="tenant", scope_id=tenant, amount=budget.amount,
            period="custom", period_anchor=start, period_seconds=period,
            hard=budget.hard, actions=budget.actions, slo=budget.slo))
    return periods


def hard_budget_use(ledger: Any, start: datetime, periods: dict[str, int]) -> dict[str, dict[str, str]]:
    """Per hard budget, from the ledger: spend in its period, % of the budget used and % overshoot
    (issue 14: the small one, hooli, must end >= 95 % used with 0 overshoot)."""
    from .report import exact, load_query

    out = {}
    for tenant, budget in BUDGETS.items():
        if not budget.hard:
            continue
        rows = ledger.query(load_query("scope_spend"), {
            "tenant": tenant, "team": "", "project": "", "agent": "", "session": "", "depth": 0, "since": start,
            "until": start + timedelta(seconds=periods[tenant]), "bucket_seconds": periods[tenant]}).dicts()
        spent = sum((r["cost_usd"] for r in rows), Decimal(0))
        out[tenant] = {"period_start": start.isoformat(), "period_end": (start + timedelta(seconds=periods[tenant])).isoformat(),
                       "budget_usd": exact(budget.amount), "spent_usd": exact(spent),
                       "used_pct": f"{spent * 100 / budget.amount:.1f}",
                       "overshoot_pct": f"{max(Decimal(0), spent - budget.amount) * 100 / budget.amount:.1f}"}
    return out


def wait_for_budget_decisions(feed: Any, start: datetime, periods: dict[str, int], timeout: float = 30.0) -> bool:
    """Until each tenant in `periods` has a decision in the guards' feed for that period (its reset time).
    A fail-open guard with no decision yet lets calls through unchecked, and before this wait hooli's
    first calls spent 28 % past its hard budget before its leases arrived."""
    wanted = {f"tenant:{tenant}:normal": start + timedelta(seconds=s) for tenant, s in periods.items()}

    def missing() -> list[str]:
        return sorted(key for key, end in wanted.items()
                      if (d := feed.decisions.get(key)) is None or (d.decision.reset_at or end) != end)

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with feed.changed:
            if not missing():
                return True
            feed.changed.wait(0.2)
    log.warning("budget decisions missing from the feed after %.0f s: %s", timeout, missing())
    return False


# ---- the terminal view --------------------------------------------------------------------------


def view(up: Any, outcomes: Outcomes, started: float, duration: float, url: str, seed: int):
    from rich.console import Group
    from rich.panel import Panel
    from rich.table import Table
    from rich.text import Text

    live = up.live
    snap = live.snapshot(recent=8)
    spend = {t["tenant_id"]: Decimal(t["cost_usd"]) for t in snap["tenants"]}
    tenants = Table(title="spend per tenant (stream, period to date) and what the agents saw", expand=True)
    for col in ("tenant", "budget $/h", "spent $", "used", "calls", "held back", "downgraded", "denied"):
        tenants.add_column(col, justify="left" if col == "tenant" else "right")
    for tenant, b in BUDGETS.items():
        c = outcomes.counts[tenant]
        budget = b.amount
        used = spend.get(tenant, Decimal(0)) / budget * 100
        style = "red" if used >= 100 else "yellow" if used >= 80 else ""
        tenants.add_row(tenant, f"{budget:,.2f} {'hard' if b.hard else 'soft'}", f"{spend.get(tenant, Decimal(0)):,.4f}", Text(f"{used:,.0f}%", style=style),
                        str(c["ok"] + c["downgraded"]), str(c["throttled"]), str(c["downgraded"]), str(c["denied"]))
    decisions = Table(title=f"throttle decisions {dict(snap['decision_counts'])}", expand=True)
    for col, width in (("scope", 18), ("prio", 8), ("action", 24), ("reason", None)):
        decisions.add_column(col, overflow="ellipsis", no_wrap=True, min_width=width, ratio=None if width else 1)
    colours = {"deny": "red", "preempt": "red", "throttle": "yellow", "queue": "yellow", "downgrade": "cyan", "allow": "green"}
    for d in snap["decisions"]:
        model = f" → {d['max_model']}" if d["max_model"] else ""
        decisions.add_row(Text(f"{d['scope']}:{d['scope_id']}"), d["priority"] or "*",
                          Text(d["action"] + model, style=colours.get(d["action"], "")), Text(d["reason"]))
    anomalies = Table(title=f"anomalies {dict(snap['anomaly_counts'])}", expand=True)
    for col, width in (("tenant", 9), ("kind", 16), ("severity", 8), ("message", None)):
        anomalies.add_column(col, overflow="ellipsis", no_wrap=True, min_width=width, ratio=None if width else 1)
    for a in snap["anomalies"]:
        anomalies.add_row(Text(a["tenant_id"]), a["kind"], a["severity"], Text(a["message"]))
    elapsed = time.monotonic() - started
    header = (f"[bold black on yellow] {BANNER} [/]  seed {seed}  ·  {elapsed:4.0f}/{duration:.0f} s  ·  "
              f"dashboard {url}/")
    return Panel(Group(tenants, decisions, anomalies), title="meterline demo", subtitle=header)


# ---- the run ------------------------------------------------------------------------------------


def wait_settled(up: Any, settings: Any, timeout: float = 60.0) -> bool:
    """Until the stream worker has read all usage and the sink has stored everything; False when it had not
    after `timeout` (a loaded machine): the summary then says its ledger figures are not final."""
    from .metrics import KafkaWatermarks

    kafka = KafkaWatermarks(settings)
    deadline = time.monotonic() + timeout
    try:
        while True:
            priced = kafka.lag(settings.group("streams"), settings.topic("usage")) == 0
            if priced or time.monotonic() >= deadline:
                break
            time.sleep(0.3)
    finally:
        kafka.close()
    stored = up.drain(timeout=max(5.0, deadline - time.monotonic()))
    return priced and stored


DEMO_PREFIX = "demo-"


def demo_settings(settings: Any, run: str) -> Any:
    """The run's own namespace: its topics, and an embedded ledger and state store under <data dir>/demo (the
    broker, logs and spools stay the data dir's: one local broker serves both)."""
    home = settings.data_dir / "demo"
    return settings.model_copy(update={"topic_prefix": f"{DEMO_PREFIX}{run}", "clickhouse_dsn": f"chdb://{home / 'clickhouse'}",
                                       "clickhouse_cluster": None, "streams_state_dir": home / "streams-state"})


def fresh_namespace(settings: Any) -> None:
    """Empty the demo's ledger and delete the demo topics of earlier runs (best effort: a broker that refuses
    deletes only keeps them), so this run's report is this run's."""
    from confluent_kafka.admin import AdminClient

    shutil.rmtree(settings.dsn.removeprefix("chdb://"), ignore_errors=True)
    admin = AdminClient(settings.kafka_config())
    old = [t for t in admin.list_topics(timeout=30).topics if t.startswith(DEMO_PREFIX) and not t.startswith(settings.topic_prefix + ".")]
    for topic, done in (admin.delete_topics(old, operation_timeout=30).items() if old else ()):
        try:
            done.result(30)
        except Exception as err:  # noqa: BLE001 - kept, not fatal: this run's topics are its own anyway
            log.warning("could not delete the old demo topic %s: %s", topic, err)


def run_demo(settings: Any, duration: float, seed: int, port: int | None, as_json: bool, keep: bool) -> dict[str, Any]:
    from rich.console import Console
    from rich.live import Live

    from meterline.allocator.guard import DecisionFeed
    from meterline.broker import LocalBroker
    from meterline.streams.pricing import load_catalog
    from meterline.topics import create_topics

    from .report import ReportParams, render, run_report
    from .store import DirectLedger
    from .up import ProcessComponent, Up, meterline_argv, settings_env

    console = Console(stderr=as_json)
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    with console.status("Kafka: starting or finding the broker…"):
        LocalBroker(settings).start(timeout=120)
        fresh_namespace(settings)
        create_topics(settings)
    start = datetime.now(timezone.utc).replace(second=0, microsecond=0)  # spend windows start on the minute
    up = Up(settings, port=port, simulated=True)
    up.supervisor.components.append(ProcessComponent(
        "gpu-simulator", meterline_argv("collect", "gpu", "--simulate", "--interval", "2", "--node", "sim-node-1"),
        settings_env(settings), settings.data_dir / "logs"))
    workers = start_tool_workers(settings, seed)
    up.supervisor.components.append(node_collector(settings, workers))
    with console.status("starting the pipeline (streams, sink, allocator, API)…"):
        url = up.start()
        allocator = up.supervisor.get("allocator")
        periods = publish_budgets(settings, start)
        publish_gpu_holders(settings, start)
        if allocator is not None:
            allocator.instance.ready.wait(30)
    outcomes = Outcomes()
    send_history(settings, seed, outcomes)
    catalog = load_catalog(settings.catalog)
    feed = DecisionFeed(settings).start()
    wait_for_budget_decisions(feed, start, periods)
    run_periods = publish_budgets(settings, start, duration, per_run=True)
    wait_for_budget_decisions(feed, start, run_periods)
    periods.update(run_periods)
    stop = threading.Event()
    agents = [Agent(spec, settings, feed, catalog, outcomes, stop, seed * 100 + i) for i, spec in enumerate(FLEET)]
    started, ran_from = time.monotonic(), datetime.now(timezone.utc)
    try:
        for agent in agents:
            agent.start()
        with Live(view(up, outcomes, started, duration, url, seed), console=console, refresh_per_second=4,
                  transient=False) as screen:
            while time.monotonic() - started < duration:
                up.supervisor.check(stop)
                time.sleep(0.25)
                screen.update(view(up, outcomes, started, duration, url, seed))
        stop.set()
        ran_until = datetime.now(timezone.utc)
        for agent in agents:
            agent.join(30)
        for name in ("gpu-simulator", "node-collector"):
            if (collector := up.supervisor.get(name)) is not None:
                up.supervisor.components.remove(collector)  # no new samples: the ledger can settle
                collector.stop(10)
        stop_tool_workers(workers)
        with console.status("letting the pipeline settle (every event priced and in the ledger)…"):
            settled = wait_settled(up, settings)
        params = ReportParams.parse(since=(start - timedelta(hours=1)).isoformat())
        ledger = DirectLedger(settings, up.client())
        chargeback = run_report(ledger, "chargeback", params)
        (totals,) = run_report(ledger, "totals", params).dicts()
        summary = summarise(chargeback, totals, up, outcomes, url, seed, duration)
        summary.update(compute_summary(ledger, params, chargeback, totals, workers))
        summary["hard_budgets"] = hard_budget_use(ledger, start, periods)
        summary["agents_ran"] = {"from": ran_from.isoformat(), "until": ran_until.isoformat()}  # inside the per-run periods
        summary["ledger"] = {"clickhouse_dsn": settings.dsn, "topic_prefix": settings.topic_prefix}  # this run's own
        summary["settled"] = settled  # False: some events were not yet priced or stored when the figures were read
        if as_json:
            print(json.dumps(summary))
        else:
            console.print()
            console.print(render("chargeback", params, chargeback, "table"))
            console.print(f"[bold black on yellow] {BANNER} [/]")
            if not settled:
                console.print("[yellow]the pipeline had not settled after 60 s (a busy machine?): the ledger figures "
                              "below are not final; `meterline report chargeback` later reads the rest[/]")
            console.print(f"ledger: {totals['priced_events']} priced events (agents sent {outcomes.sent}), "
                          f"usage ${summary['ledger_usage_cost_usd']} + GPU ${summary['ledger_gpu_cost_usd']} "
                          f"(${summary['ledger_gpu_idle_cost_usd']} of it idle, charged {params.gpu_idle}) "
                          f"+ CPU ${summary['ledger_cpu_cost_usd']} + memory ${summary['ledger_memory_cost_usd']} = "
                          f"chargeback ${summary['chargeback_total_usd']} "
                          f"({'[green]equal[/]' if summary['chargeback_equals_ledger'] else '[red]MISMATCH[/]'})")
            console.print(compute_table(summary))
            console.print(compute_line(summary))
            console.print(f"decisions {summary['decisions']} · anomalies {summary['anomalies']}")
            for tenant, use in summary["hard_budgets"].items():
                console.print(f"hard budget {tenant}: ${use['spent_usd']} of ${use['budget_usd']} spent in its period = "
                              f"{use['used_pct']} % used, overshoot {use['overshoot_pct']} %")
            console.print(f"dashboard: {url}/ (served while the demo runs; `--keep` keeps it)  ·  this run's ledger, kept "
                          f"until the next demo: `METERLINE_CLICKHOUSE_DSN={settings.dsn} meterline report chargeback --by team`",
                          markup=False)
        if keep:
            console.print("serving the dashboard until Ctrl-C…")
            try:
                up.run_until(threading.Event())
            except KeyboardInterrupt:
                pass
        return summary
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):  # a second Ctrl-C must not cut the clean stop short
            signal.signal(sig, lambda *_: console.print("stopping cleanly, please wait…"))
        stop.set()
        feed.close()
        up.stop()
        stop_tool_workers(workers)


def summarise(chargeback: Any, totals: dict, up: Any, outcomes: Outcomes, url: str, seed: int, duration: float) -> dict[str, Any]:
    from .report import exact

    total_col = chargeback.columns.index("total_cost_usd")
    charged = sum((row[total_col] for row in chargeback.rows), Decimal(0))
    usage = totals["usage_cost_usd"] or Decimal(0)
    gpu = (totals["gpu_cost_usd"] or Decimal(0)) + totals["gpu_idle_cost_usd"]  # what the devices cost
    snap = up.live.snapshot()
    return {
        "simulated": True, "seed": seed, "duration_s": duration, "dashboard": url + "/",
        "events_sent": outcomes.sent, "priced_events": totals["priced_events"],
        "ledger_usage_cost_usd": exact(usage), "ledger_gpu_cost_usd": exact(gpu),
        "ledger_gpu_idle_cost_usd": exact(totals["gpu_idle_cost_usd"]),
        "chargeback_total_usd": exact(charged), "chargeback_equals_ledger": charged == totals["total_cost_usd"],
        "decisions": snap["decision_counts"], "anomalies": snap["anomaly_counts"],
        "ledger_decisions": totals["decisions"], "ledger_anomalies": totals["anomalies"],
        "agents": {t: dict(c) for t, c in outcomes.counts.items()},
        "chargeback": [{k: exact(v) for k, v in row.items()} for row in chargeback.dicts()],
    }


# ---- real CPU and memory: tool workers measured by `collect node` -----------------------------

# (tenant, agent) -> (what the worker stands for, share of one core it burns, MiB it holds)
TOOL_WORKERS: dict[tuple[str, str], tuple[str, float, int]] = {
    ("acme", "retriever"): ("headless browser", 0.10, 64),
    ("globex", "trainer"): ("local model", 0.15, 160),
    ("initech", "coder"): ("code interpreter", 0.08, 48),
    ("umbrella", "summarizer"): ("document parser", 0.04, 32),
    ("hooli", "extractor"): ("ETL worker", 0.04, 32),
}


@dataclass
class ToolWorker:
    spec: AgentSpec
    role: str
    proc: Any  # subprocess.Popen


def tool_worker(duty: float, mib: int) -> None:
    """A tool process: burns `duty` of one core in 100 ms slices and holds `mib` MiB (touched, so resident),
    until its stdin closes (the demo ends, or dies)."""
    import sys

    ballast = bytearray(mib << 20)
    for i in range(0, len(ballast), 4096):
        ballast[i] = 1
    done = threading.Event()
    threading.Thread(target=lambda: (sys.stdin.read(), done.set()), daemon=True).start()
    while not done.is_set():
        busy_until = time.thread_time() + 0.1 * duty
        while time.thread_time() < busy_until:
            pass
        done.wait(0.1 * (1 - duty))
    del ballast


def start_tool_workers(settings: Any, seed: int) -> list[ToolWorker]:
    """One real worker process per agent in TOOL_WORKERS, launched with its agent's session in its environment
    (METERLINE_TENANT_ID, ... : how `collect node` attributes a process that does not use the SDK)."""
    import subprocess
    import sys

    from .up import _die_with_parent, settings_env

    workers = []
    for i, spec in enumerate(FLEET):
        if (spec.tenant, spec.agent) not in TOOL_WORKERS:
            continue
        role, duty, mib = TOOL_WORKERS[(spec.tenant, spec.agent)]
        env = settings_env(settings) | {
            "METERLINE_TENANT_ID": spec.tenant, "METERLINE_TEAM": spec.team, "METERLINE_PROJECT": spec.project,
            "METERLINE_AGENT_ID": spec.agent, "METERLINE_SESSION_ID": session_of(spec, seed * 100 + i)}
        proc = subprocess.Popen([sys.executable, "-c", f"from meterline.app.demo import tool_worker; tool_worker({duty}, {mib})"],
                                env=env, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, preexec_fn=_die_with_parent)
        workers.append(ToolWorker(spec, role, proc))
    return workers


def node_collector(settings: Any, workers: list[ToolWorker]) -> Any:
    """`meterline collect node` over the tool workers' process trees only (not the rest of this machine)."""
    from .up import ProcessComponent, meterline_argv, settings_env

    pids = [arg for w in workers for arg in ("--pid", str(w.proc.pid))]
    return ProcessComponent("node-collector", meterline_argv("collect", "node", "--interval", "2", "--json", *pids),
                            settings_env(settings), settings.data_dir / "logs")


def stop_tool_workers(workers: list[ToolWorker]) -> None:
    for w in workers:
        if w.proc.poll() is None:
            w.proc.stdin.close()  # the worker's cue to exit
    for w in workers:
        try:
            w.proc.wait(10)
        except Exception:  # noqa: BLE001 - it would not stop: kill it
            w.proc.kill()


def compute_summary(ledger: Any, params: Any, chargeback: Any, totals: dict, workers: list[ToolWorker]) -> dict[str, Any]:
    """The measured CPU and memory in the ledger, and the three totals that must agree: chargeback (its rows),
    FOCUS (EffectiveCost of every row) and the ledger's own grand total."""
    from .focus import focus_rows
    from .report import exact

    focus = focus_rows(ledger, params)
    focus_total = sum((Decimal(r["EffectiveCost"]) for r in focus), Decimal(0))  # BilledCost leaves out what providers bill
    quantity = {kind: sum((Decimal(r["ConsumedQuantity"]) for r in focus if r.get("x_Kind") == kind), Decimal(0))
                for kind in ("cpu", "memory")}
    total_col = chargeback.columns.index("total_cost_usd")
    charged = sum((row[total_col] for row in chargeback.rows), Decimal(0))
    return {
        "compute_measured": "real processes (tool workers), not simulated",
        "tool_workers": {f"{w.spec.tenant}/{w.spec.agent}": w.role for w in workers},
        "ledger_cpu_cost_usd": exact(totals["cpu_cost_usd"] or Decimal(0)),
        "ledger_memory_cost_usd": exact(totals["memory_cost_usd"] or Decimal(0)),
        "vcpu_hours": exact(quantity["cpu"]), "memory_gib_hours": exact(quantity["memory"]),
        "ledger_total_usd": exact(totals["total_cost_usd"]), "focus_total_usd": exact(focus_total),
        "focus_rows": len(focus), "totals_reconcile": charged == focus_total == totals["total_cost_usd"],
    }


def compute_table(summary: dict[str, Any]) -> Any:
    """Per tenant: tokens and GPU (simulated) beside the CPU and memory its tool worker really used, to the
    micro-dollar (the chargeback table rounds to 4 places, where a worker's CPU is a few hundredths of a cent)."""
    from rich.table import Table
    from rich.text import Text

    table = Table(title="CPU and memory beside tokens and GPU, per tenant (CPU and memory: MEASURED real processes)")
    for col in ("tenant", "tokens (sim)", "usage $ (sim)", "GPU $ (sim)", "CPU s", "CPU $", "mem $"):
        table.add_column(col, justify="left" if col == "tenant" else "right")
    for row in summary["chargeback"]:
        money = {k: Decimal(row.get(k) or 0).quantize(Decimal("0.000001")) for k in
                 ("usage_cost_usd", "gpu_cost_usd", "gpu_idle_cost_usd", "cpu_cost_usd", "memory_cost_usd")}
        table.add_row(Text(row["tenant"]), f"{int(row['input_tokens']) + int(row['output_tokens']):,}", str(money["usage_cost_usd"]),
                      str(money["gpu_cost_usd"] + money["gpu_idle_cost_usd"]), str(row["cpu_seconds"]),
                      str(money["cpu_cost_usd"]), str(money["memory_cost_usd"]))
    return table


def compute_line(summary: dict[str, Any]) -> str:
    ok = "[green]equal[/]" if summary["totals_reconcile"] else "[red]MISMATCH[/]"
    return (f"CPU ${summary['ledger_cpu_cost_usd']} ({summary['vcpu_hours']} vCPU-h) + memory ${summary['ledger_memory_cost_usd']} "
            f"({summary['memory_gib_hours']} GiB-h): MEASURED on {len(summary['tool_workers'])} real tool-worker processes by "
            f"`collect node` · chargeback = FOCUS ${summary['focus_total_usd']} = ledger ${summary['ledger_total_usd']} ({ok})")


def demo_command(
    duration: Annotated[float, typer.Option(help="Seconds the simulated fleet runs.")] = 60.0,
    seed: Annotated[int, typer.Option(help="Random seed: the same seed gives the same fleet behaviour.")] = 7,
    port: Annotated[Optional[int], typer.Option(help="HTTP port for the dashboard (default 8787).")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the summary as JSON (the live view goes to stderr).")] = False,
    keep: Annotated[bool, typer.Option("--keep", help="Keep serving the dashboard after the fleet stops, until Ctrl-C.")] = False,
) -> None:
    """Run the whole pipeline with a SIMULATED fleet of agents and watch it work.

    Starts Kafka if needed, creates topics, migrates the ledger, runs `meterline up` and drives
    tenants with budgets, a priority mix, a simulated GPU node, a runaway agent and a tenant that
    runs out of budget. The live view shows spend, decisions and anomalies; the agents obey the
    allocator (throttled, downgraded, denied). Ends with a chargeback table and the dashboard URL.
    """
    from meterline.console import fail
    from meterline.settings import get_settings

    from .store import running_up

    settings = demo_settings(get_settings(), time.strftime("%Y%m%d%H%M%S", time.gmtime()))
    logs = settings.data_dir / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    logging.basicConfig(level=logging.INFO, filename=str(logs / "demo.log"),
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    if running_up(settings):
        fail(f"`meterline up` already runs on {settings.data_dir}; stop it, or run the demo with another METERLINE_DATA_DIR")

    def interrupted(*_: Any) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, interrupted)  # SIGTERM stops the demo as cleanly as Ctrl-C
    try:
        run_demo(settings, duration, seed, port, as_json, keep)
    except KeyboardInterrupt:
        fail("interrupted; the pipeline was stopped cleanly", code=130)
    except Exception as err:  # noqa: BLE001 - one clear line; the log has the rest
        log.exception("demo failed")
        from rich.markup import escape

        fail(escape(f"the demo stopped: {err} (details in {logs / 'demo.log'})"))
