"""`meterline report` against a real migrated chDB ledger with a known ground truth.

The ledger is filled once per module (priced events with cache tokens, provider-reported
and unpriced costs, tool calls, failures; GPU samples at device and process level; a
budget). Every report, in every format, is checked against totals computed here with
Decimal. The CLI runs in-process (typer's CliRunner) so the one-chDB-path-per-process
rule holds: the module's client is closed before any command opens the store.
"""
from __future__ import annotations

import csv
import gc
import io
import json
import random
import re
from collections import defaultdict
from datetime import datetime, timedelta, timezone
from decimal import Decimal

import httpx
import pytest
from hypothesis import HealthCheck, given, settings as hsettings, strategies as st
from typer.testing import CliRunner

from inprocess import cli_on, filled_ledger
from meterline.cli import app
from meterline.schemas.events import BudgetPolicy, ComputeSample, GpuSample, PricedEvent, new_id
from meterline.settings import Settings, get_settings
from meterline.sql import ledger
from meterline.sql.rows import budget_policy_row, compute_sample_row, gpu_sample_row, priced_event_row, with_offsets

from meterline.app.focus import focus_rows, idle_rows
from meterline.streams.pricing import NO_COMPONENTS, load_catalog, token_components
from meterline.app.report import REPORTS, ReportParams, burn_down, period_bounds, run_report
from meterline.app.store import DirectLedger

ZERO = Decimal(0)
STREAM_UNATTRIBUTED = "unattributed"  # the stream's spend tenant for GPU time without one (test_streams_pipeline.py)
NOW = datetime.now(timezone.utc).replace(microsecond=0)
SINCE = (NOW - timedelta(hours=2)).isoformat()
UNTIL = (NOW + timedelta(minutes=1)).isoformat()
TENANTS = ("acme", "globex", "initech")
TEAMS = ("search", "support", "research")
MODELS = (("openai", "gpt-4o"), ("anthropic", "claude-sonnet-4"), ("openai", "gpt-4o-mini"))
UNPRICED_MODEL = ("acme-labs", "in-house-7b")
CATALOG = load_catalog()  # the export reads list rates from the same catalog
FOCUS_12 = (  # the FOCUS 1.2 column list, written out independently of meterline.app.focus
    "AvailabilityZone BilledCost BillingAccountId BillingAccountName BillingAccountType BillingCurrency BillingPeriodEnd "
    "BillingPeriodStart CapacityReservationId CapacityReservationStatus ChargeCategory ChargeClass ChargeDescription "
    "ChargeFrequency ChargePeriodEnd ChargePeriodStart CommitmentDiscountCategory CommitmentDiscountId "
    "CommitmentDiscountName CommitmentDiscountQuantity CommitmentDiscountStatus CommitmentDiscountType "
    "CommitmentDiscountUnit ConsumedQuantity ConsumedUnit ContractedCost ContractedUnitPrice EffectiveCost InvoiceId "
    "InvoiceIssuerName ListCost ListUnitPrice PricingCategory PricingCurrency PricingCurrencyContractedUnitPrice "
    "PricingCurrencyEffectiveCost PricingCurrencyListUnitPrice PricingQuantity PricingUnit ProviderName PublisherName "
    "RegionId RegionName ResourceId ResourceName ResourceType ServiceCategory ServiceName ServiceSubcategory SkuId "
    "SkuMeter SkuPriceDetails SkuPriceId SubAccountId SubAccountName SubAccountType Tags"
).split()


def usd(rng: random.Random, digits: int = 12) -> Decimal:
    return Decimal(rng.randrange(1, 10**9)) / Decimal(10**digits)


def make_events(rng: random.Random, n: int = 240) -> list[PricedEvent]:
    events = []
    for i in range(n):
        tenant, team = rng.choice(TENANTS), rng.choice(TEAMS)
        agent = f"{tenant}-agent-{rng.randrange(3)}"
        common = dict(event_id=new_id(), ts=NOW - timedelta(seconds=rng.randrange(1, 3600)), tenant_id=tenant, team=team,
                      project=f"p{rng.randrange(2)}", agent_id=agent, session_id=f"{agent}-s{rng.randrange(4)}",
                      status=rng.choice(("ok", "ok", "ok", "error")), priority=rng.choice(("high", "normal", "batch")),
                      catalog_version="test-1", priced_at=NOW)
        if i % 10 == 9:  # a tool call: one unit price, no token components
            units = rng.randrange(1, 4)
            cost = CATALOG.tool_unit_price("web_search", "", common["ts"]) * units
            events.append(PricedEvent(**common, kind="tool_call", tool="web_search", units=units,
                                      cost_usd=cost, list_cost_usd=cost, cost_source="catalog"))
            continue
        provider, model = rng.choice(MODELS)
        if i % 37 == 0:
            provider, model = UNPRICED_MODEL  # nobody prices it: cost 0, cost_source unpriced
        cache_read, cache_write = rng.randrange(0, 500), rng.randrange(0, 50)
        tokens = dict(input_tokens=1000 + cache_read + cache_write, output_tokens=rng.randrange(1, 900),
                      cache_read_tokens=cache_read, cache_write_tokens=cache_write)
        rates = CATALOG.rates_for(provider, model, common["ts"])  # list prices the pricer would give
        comp = token_components(rates, *tokens.values()) if rates else NO_COMPONENTS
        parts = dict(input_cost_usd=comp.input, output_cost_usd=comp.output, cache_read_cost_usd=comp.cache_read,
                     cache_write_cost_usd=comp.cache_write)
        listed = comp.total
        source, cost = ("catalog", listed) if rates else ("unpriced", ZERO)
        if i % 13 == 0 and rates:
            source, cost = "provider", usd(rng)  # provider-reported: overrides the catalog
        events.append(PricedEvent(**common, kind="llm_call", provider=provider, model=model, **tokens, cost_usd=cost,
                                  list_cost_usd=listed, cost_source=source, **parts))
    return events


def make_gpu(rng: random.Random) -> list[tuple[GpuSample, Decimal, Decimal]]:
    rows = []
    for k in range(30):
        ts = NOW - timedelta(seconds=10 * (k + 1))
        base = dict(ts=ts, node="node-1", gpu_index=0, gpu_uuid="GPU-aaaa", gpu_name="NVIDIA H100 80GB HBM3", interval_ms=10_000)
        rows.append((GpuSample(sample_id=new_id(), level="gpu", utilization_pct=rng.randrange(0, 101), **base),
                     Decimal(10), Decimal("0.006916666667")))
        owner = ("acme", "search", "p0", "acme-agent-0", "acme-agent-0-s0") if k % 3 else ("", "", "", "", "")
        pod = {"namespace": "ml", "pod": f"trainer-{k % 2}"} if k % 3 == 1 else {}  # a DCGM pod row, else a bare pid
        rows.append((GpuSample(sample_id=new_id(), level="process", pid=4242, attributed=bool(owner[0]),
                               tenant_id=owner[0], team=owner[1], project=owner[2], agent_id=owner[3], session_id=owner[4],
                               **pod, **base),
                     Decimal(10), Decimal("0.006916666667")))
    return rows


def make_compute() -> list[tuple[ComputeSample, Decimal, Decimal]]:
    """CPU and memory of one attributed process (acme's agent 0, session 0) and one nobody owns, priced by the catalog."""
    rows = []
    for k in range(12):
        owner = ("acme", "search", "p0", "acme-agent-0", "acme-agent-0-s0") if k % 2 else ("", "", "", "", "")
        sample = ComputeSample(sample_id=new_id(), ts=NOW - timedelta(seconds=10 * (k + 1)), node="node-1", node_class="n2",
                               level="process", pid=5000 + k % 2, interval_ms=10_000, cpu_user_seconds=Decimal("7.5"),
                               cpu_system_seconds=Decimal("0.5"), memory_bytes=2 << 30, memory_peak_bytes=3 << 30,
                               memory_byte_seconds=Decimal(20 << 30), attributed=bool(owner[0]), tenant_id=owner[0],
                               team=owner[1], project=owner[2], agent_id=owner[3], session_id=owner[4],
                               **({"namespace": "ml", "pod": "trainer-1"} if k % 4 == 1 else {}))
        rows.append((sample, *CATALOG.compute_sample_cost(sample)))
    return rows


pytestmark = pytest.mark.xdist_group("app_report")  # one process makes the module fixtures (make test: loadgroup)


@pytest.fixture(scope="module")
def truth(tmp_path_factory):
    """Fill a fresh ledger; return the events and GPU rows that went in."""
    rng = random.Random(20250601)
    events, gpu, compute = make_events(rng), make_gpu(rng), make_compute()
    policy = BudgetPolicy(policy_id="acme-month", tenant_id="acme", scope="tenant", scope_id="acme", amount=Decimal("0.5"),
                          period="custom", period_anchor=NOW - timedelta(days=1), period_seconds=2 * 86400)
    cpu_policy = policy.model_copy(update={"policy_id": "acme-cpu", "unit": "vcpu_hours", "amount": Decimal("0.05")})
    # 24-minute periods, so one-minute buckets: the six attributed CPU samples (8 s each, 20 s apart) always fall in
    # two or three buckets, whose per-bucket hours truncated at 18 places would sum below the total's
    minutes = cpu_policy.model_copy(update={"policy_id": "acme-cpu-minutes", "period_seconds": 1440,
                                            "period_anchor": NOW - timedelta(seconds=600 + 60 * 1440)})
    tables = {"priced_events": [with_offsets(priced_event_row(e), "priced", 0, i) for i, e in enumerate(events)],
              "gpu_samples": [with_offsets(gpu_sample_row(s, sec, cost, "test-1"), "gpu", 0, i)
                              for i, (s, sec, cost) in enumerate(gpu)],
              "compute_samples": [with_offsets(compute_sample_row(s, cpu, mem, "test-1"), "compute", 0, i)
                                  for i, (s, cpu, mem) in enumerate(compute)],
              "budget_policies": [with_offsets(budget_policy_row(p), "budgets", 0, i) for i, p in enumerate((policy, cpu_policy, minutes))]}
    with filled_ledger(tmp_path_factory.mktemp("app-report"), tables) as settings:
        yield {"events": events, "gpu": gpu, "compute": compute, "settings": settings}


@pytest.fixture
def cli(truth, monkeypatch):
    with cli_on(truth["settings"], monkeypatch) as invoke:
        yield invoke


DIMS = {"tenant": "tenant_id", "team": "team", "project": "project", "agent": "agent_id", "session": "session_id", "model": "model",
        "namespace": "namespace", "pod": "pod"}
PATH = ("tenant_id", "team", "project", "agent_id", "session_id")


def chargeback_key(record, by: str, tenant: str | None = None) -> str:
    """Below the tenant a key is the path from it ('acme/search'): equal team names of two tenants stay apart."""
    if by == "model":
        return record.model
    if by in ("namespace", "pod"):  # only GPU and compute rows of a pod have one; tokens and tools: ''
        pod = getattr(record, "pod", "")
        return getattr(record, "namespace", "") if by == "namespace" else (f"{record.namespace}/{pod}" if pod else "")
    path = [tenant if tenant is not None else record.tenant_id] + [getattr(record, f) for f in PATH[1:]]
    return "/".join(path[: PATH.index(DIMS[by]) + 1])


def expected_chargeback(truth, by: str) -> dict[str, dict[str, Decimal]]:
    out: dict[str, dict[str, Decimal]] = defaultdict(lambda: defaultdict(Decimal))
    for e in truth["events"]:
        key = chargeback_key(e, by)
        out[key]["usage_cost_usd"] += e.cost_usd
        out[key]["events"] += 1
        out[key]["cache_read_tokens"] += e.cache_read_tokens
    for sample, seconds, cost in truth["gpu"]:
        if sample.level != "process":
            continue
        key = f"gpu:{sample.gpu_name}" if by == "model" else chargeback_key(sample, by, sample.tenant_id or STREAM_UNATTRIBUTED)
        out[key]["gpu_cost_usd"] += cost
        out[key]["gpu_seconds"] += seconds
    for sample, cpu, memory in truth["compute"]:
        key = "compute:n2" if by == "model" else chargeback_key(sample, by, sample.tenant_id or STREAM_UNATTRIBUTED)
        out[key]["cpu_cost_usd"] += cpu
        out[key]["memory_cost_usd"] += memory
        out[key]["cpu_seconds"] += sample.cpu_seconds
    for v in out.values():
        v["total_cost_usd"] = v["usage_cost_usd"] + v["gpu_cost_usd"] + v["cpu_cost_usd"] + v["memory_cost_usd"]
    return out


@pytest.mark.parametrize("by", list(DIMS))
def test_chargeback_json_matches_ground_truth_for_every_dimension(cli, truth, by):
    doc = json.loads(cli("report", "chargeback", "--by", by, "--since", SINCE, "--until", UNTIL, "--format", "json"))
    want = expected_chargeback(truth, by)
    got = {r[by]: r for r in doc["rows"]}
    assert set(got) == set(want)
    for key, w in want.items():
        for col in ("usage_cost_usd", "gpu_cost_usd", "cpu_cost_usd", "memory_cost_usd", "total_cost_usd", "gpu_seconds",
                    "cpu_seconds"):
            assert Decimal(got[key][col]) == w[col], (key, col)  # exact, from decimal strings
        assert got[key]["events"] == w["events"]
        assert got[key]["cache_read_tokens"] == w["cache_read_tokens"]


def test_chargeback_by_pod_names_kubernetes_rows_and_shows_the_rest_as_none(cli, truth):
    rows = json.loads(cli("report", "chargeback", "--by", "pod", "--since", SINCE, "--until", UNTIL, "-f", "json"))["rows"]
    pods = {r["pod"]: r for r in rows}
    assert set(pods) == {"", "ml/trainer-0", "ml/trainer-1"}  # json keeps '' for what ran in no pod
    assert Decimal(pods["ml/trainer-1"]["cpu_cost_usd"]) > 0 and Decimal(pods["ml/trainer-0"]["cpu_cost_usd"]) == 0
    assert Decimal(pods[""]["usage_cost_usd"]) == sum((e.cost_usd for e in truth["events"]), ZERO)  # tokens have no pod
    table = cli("report", "chargeback", "--by", "namespace", "--since", SINCE, "--until", UNTIL)
    assert "(none)" in table and "ml" in table


def test_chargeback_csv_and_table_carry_the_same_totals(cli, truth):
    want_total = sum((v["total_cost_usd"] for v in expected_chargeback(truth, "team").values()), ZERO)
    rows = list(csv.DictReader(io.StringIO(cli("report", "chargeback", "--by", "team", "--since", SINCE, "--until", UNTIL, "--format", "csv"))))
    assert sum(Decimal(r["total_cost_usd"]) for r in rows) == want_total
    assert all("E" not in r["total_cost_usd"] for r in rows)  # plain decimals, never exponent notation
    table = cli("report", "chargeback", "--by", "team", "--since", SINCE, "--until", UNTIL)
    for tenant in TENANTS:
        for team in TEAMS:
            assert f"{tenant}/{team}" in table
    assert "TOTAL" in table and f"{want_total.quantize(Decimal('0.0001')):,}" in table


def test_filters_are_parameters_not_sql(cli, truth):
    acme = json.loads(cli("report", "chargeback", "--by", "team", "--tenant", "acme", "--since", SINCE, "--until", UNTIL, "-f", "json"))
    want = sum((e.cost_usd for e in truth["events"] if e.tenant_id == "acme"), ZERO)
    want += sum((c for s, _, c in truth["gpu"] if s.level == "process" and s.tenant_id == "acme"), ZERO)
    want += sum((cpu + mem for s, cpu, mem in truth["compute"] if s.tenant_id == "acme"), ZERO)
    assert sum(Decimal(r["total_cost_usd"]) for r in acme["rows"]) == want
    injected = json.loads(cli("report", "chargeback", "--tenant", "x' OR 1=1 --", "--since", SINCE, "--until", UNTIL, "-f", "json"))
    assert injected["rows"] == []


def test_top_sessions_are_ordered_and_limited(cli, truth):
    doc = json.loads(cli("report", "top-sessions", "--limit", "5", "--since", SINCE, "--until", UNTIL, "-f", "json"))
    totals = [Decimal(r["total_cost_usd"]) for r in doc["rows"]]
    assert len(totals) == 5 and totals == sorted(totals, reverse=True)
    sessions: dict[tuple[str, str], Decimal] = defaultdict(Decimal)
    for e in truth["events"]:
        sessions[(e.tenant_id, e.session_id)] += e.cost_usd
    for s, _, cost in truth["gpu"]:
        if s.level == "process" and s.session_id:
            sessions[(s.tenant_id, s.session_id)] += cost
    for s, cpu, memory in truth["compute"]:
        if s.attributed:
            sessions[(s.tenant_id, s.session_id)] += cpu + memory
    assert totals[0] == max(sessions.values())
    every = json.loads(cli("report", "top-sessions", "--limit", "1000", "--since", SINCE, "--until", UNTIL, "-f", "json"))
    got = {(r["tenant_id"], r["session_id"]): r for r in every["rows"]}
    assert {k: Decimal(r["total_cost_usd"]) for k, r in got.items()} == dict(sessions)
    s0 = ("acme", "acme-agent-0-s0")
    assert Decimal(got[s0]["compute_cost_usd"]) == sum((c + m for s, c, m in truth["compute"] if s.attributed), ZERO) > 0


def test_cost_per_successful_action(cli, truth):
    doc = json.loads(cli("report", "cost-per-action", "--since", SINCE, "--until", UNTIL, "-f", "json"))
    row = next(r for r in doc["rows"] if r["agent_id"] == "acme-agent-0")
    mine = [e for e in truth["events"] if e.agent_id == "acme-agent-0"]
    gpu = sum((c for s, _, c in truth["gpu"] if s.level == "process" and s.agent_id == "acme-agent-0"), ZERO)
    gpu += sum((c + m for s, c, m in truth["compute"] if s.agent_id == "acme-agent-0"), ZERO)  # its CPU and memory
    ok = sum(1 for e in mine if e.status == "ok")
    total = sum((e.cost_usd for e in mine), ZERO) + gpu
    assert row["successful_actions"] == ok and row["actions"] == len(mine)
    assert Decimal(row["total_cost_usd"]) == total
    assert abs(Decimal(row["cost_per_success_usd"]) - total / ok) < Decimal("1e-17")


def test_gpu_hours_cost_and_utilisation(cli, truth):
    doc = json.loads(cli("report", "gpu", "--since", SINCE, "--until", UNTIL, "-f", "json"))
    (row,) = doc["rows"]
    device = [(s, sec, c) for s, sec, c in truth["gpu"] if s.level == "gpu"]
    assert abs(Decimal(row["gpu_hours"]) - sum((sec for _, sec, _ in device), ZERO) / 3600) < Decimal("1e-17")  # hours: 18 places
    assert Decimal(row["cost_usd"]) == sum((c for _, _, c in device), ZERO)
    mean_util = sum(s.utilization_pct for s, _, _ in device) / len(device)
    assert abs(float(row["avg_utilization_pct"]) - mean_util) <= 0.05
    idle = sum((c * (100 - s.utilization_pct) / 100 for s, _, c in device), ZERO)
    assert Decimal(row["idle_cost_usd"]) == idle
    assert row["sessions"] == 1


def test_burn_down_against_the_budget(cli, truth):
    doc = json.loads(cli("report", "burn-down", "-f", "json"))
    row = next(r for r in doc["rows"] if r["policy_id"] == "acme-month")
    spent = sum((e.cost_usd for e in truth["events"] if e.tenant_id == "acme"), ZERO)
    spent += sum((c for s, _, c in truth["gpu"] if s.level == "process" and s.attributed and s.tenant_id == "acme"), ZERO)
    spent += sum((cpu + mem for s, cpu, mem in truth["compute"] if s.attributed and s.tenant_id == "acme"), ZERO)  # as the stream
    assert Decimal(row["spent"]) == spent
    assert Decimal(row["remaining"]) == Decimal("0.5") - spent
    # half of the 2-day period had passed at NOW (taken at collection); 55 %: the CLI's clock up to 2.4 h later
    assert row["policy_id"] == "acme-month" and Decimal(49) < Decimal(row["elapsed_pct"]) < Decimal(55)
    assert Decimal(row["used_pct"]) == (spent * 100 / Decimal("0.5")).quantize(Decimal("0.01"))


def test_burn_down_of_a_vcpu_hour_budget_counts_cpu_seconds(cli, truth):
    row = next(r for r in json.loads(cli("report", "burn-down", "-f", "json"))["rows"] if r["policy_id"] == "acme-cpu")
    _assert_cpu_hours(row, truth)


def test_burn_down_of_one_minute_buckets_counts_every_cpu_second(truth):
    """The 24-minute periods' current one holds the samples only until NOW + 14 min, and this module's NOW is taken
    when pytest collects it (a CI run reaches this test many minutes later): so the report is asked at NOW."""
    client = ledger.connect(truth["settings"])
    try:
        rows = burn_down(DirectLedger(truth["settings"], client), ReportParams.parse(), now=NOW).dicts()
    finally:
        client.close()
        gc.collect()
    _assert_cpu_hours(next(r for r in rows if r["policy_id"] == "acme-cpu-minutes"), truth)


def _assert_cpu_hours(row: dict, truth: dict) -> None:
    hours = sum((s.cpu_seconds for s, _, _ in truth["compute"] if s.attributed and s.tenant_id == "acme"), ZERO) / 3600
    assert row["unit"] == "vcpu_hours" and hours > 0
    assert Decimal(row["spent"]) == hours.quantize(Decimal(row["spent"]))  # CPU time, not dollars
    assert Decimal(row["remaining"]) == Decimal("0.05") - Decimal(row["spent"])


def test_totals_equal_the_chargeback_sum(cli, truth):
    (tot,) = json.loads(cli("report", "totals", "--since", SINCE, "--until", UNTIL, "-f", "json"))["rows"]
    assert Decimal(tot["usage_cost_usd"]) == sum((e.cost_usd for e in truth["events"]), ZERO)
    assert tot["priced_events"] == len(truth["events"])
    assert tot["unpriced_events"] == sum(1 for e in truth["events"] if e.cost_source == "unpriced")
    assert Decimal(tot["cpu_cost_usd"]) == sum((cpu for _, cpu, _ in truth["compute"]), ZERO) > 0
    assert Decimal(tot["memory_cost_usd"]) == sum((mem for _, _, mem in truth["compute"]), ZERO) > 0
    chargeback = json.loads(cli("report", "chargeback", "--since", SINCE, "--until", UNTIL, "-f", "json"))["rows"]
    assert Decimal(tot["total_cost_usd"]) == sum((Decimal(r["total_cost_usd"]) for r in chargeback), ZERO)


FOCUS_13 = sorted(FOCUS_12 + [  # FOCUS 1.3's additions (ProviderName / PublisherName deprecated, still there)
    "AllocatedMethodDetails", "AllocatedMethodId", "AllocatedResourceId", "AllocatedResourceName", "AllocatedTags",
    "ContractApplied", "HostProviderName", "ServiceProviderName"])
DECIMAL_RE = re.compile(r"^-?\d+(\.\d+)?$")  # FOCUS NumericFormat: no exponent, no thousands separator
DATETIME_RE = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ$")  # FOCUS DateTimeFormat, UTC
SERVICE_SUBCATEGORIES = {  # the part of FOCUS's ServiceCategory / ServiceSubcategory table meterline uses
    "AI and Machine Learning": {"AI Platforms", "Bots", "Generative AI", "Machine Learning", "Natural Language Processing",
                                "Other (AI and Machine Learning)"},
    "Compute": {"Containers", "End User Computing", "Quantum Compute", "Serverless Compute", "Virtual Machines",
                "Other (Compute)"},
}
D = Decimal
# The spec's mandatory and conditional rules that apply to meterline's rows, as data: (rule, applies to
# version, condition, requirement). Cells are CSV text; "" is null. Written from the FOCUS 1.2/1.3 column
# text and focus-validator's rule ids, independently of meterline.app.focus.
NOT_NULL_ALWAYS = ("BilledCost", "BillingAccountId", "BillingAccountName", "BillingAccountType", "BillingCurrency",
                   "BillingPeriodEnd", "BillingPeriodStart", "ChargeCategory", "ChargeDescription", "ChargeFrequency",
                   "ChargePeriodEnd", "ChargePeriodStart", "ContractedCost", "EffectiveCost", "InvoiceId",
                   "InvoiceIssuerName", "ListCost", "PricingCurrency", "ProviderName", "PublisherName", "ServiceCategory",
                   "ServiceName", "ServiceSubcategory", "SubAccountId", "SubAccountName", "SubAccountType")
NOT_NULL_FOR_USAGE = ("ConsumedQuantity", "ConsumedUnit", "ContractedUnitPrice", "ListUnitPrice", "PricingCategory",
                      "PricingQuantity", "PricingUnit", "SkuId", "SkuMeter", "SkuPriceId")
NULL_UNSUPPORTED = ("AvailabilityZone", "CapacityReservationId", "CapacityReservationStatus", "CommitmentDiscountCategory",
                    "CommitmentDiscountId", "CommitmentDiscountName", "CommitmentDiscountQuantity",
                    "CommitmentDiscountStatus", "CommitmentDiscountType", "CommitmentDiscountUnit", "RegionId", "RegionName")
DECIMALS = ("BilledCost", "EffectiveCost", "ListCost", "ContractedCost", "ListUnitPrice", "ContractedUnitPrice",
            "PricingQuantity", "ConsumedQuantity", "PricingCurrencyEffectiveCost", "PricingCurrencyListUnitPrice",
            "PricingCurrencyContractedUnitPrice")
ALLOWED = {"ChargeCategory": {"Usage", "Purchase", "Tax", "Credit", "Adjustment"}, "ChargeClass": {"", "Correction"},
           "ChargeFrequency": {"One-Time", "Recurring", "Usage-Based"},
           "PricingCategory": {"", "Standard", "Dynamic", "Committed", "Other"}, "BillingCurrency": {"USD"},
           "PricingCurrency": {"USD"}}
ALLOCATION = ("AllocatedMethodId", "AllocatedMethodDetails", "AllocatedResourceId", "AllocatedResourceName", "AllocatedTags")


def _json_object(text: str) -> bool:
    return isinstance(json.loads(text, parse_float=D), dict)


def _product(r, unit: str, cost: str) -> bool:
    return D(r[unit]) * D(r["PricingQuantity"]) == D(r[cost])


RULES = [
    *[(f"{c} not null", "all", lambda r: True, lambda r, c=c: r[c] != "") for c in NOT_NULL_ALWAYS],
    *[(f"{c} not null for Usage", "all", lambda r: r["ChargeCategory"] in ("Usage", "Purchase") and r["ChargeClass"] != "Correction",
       lambda r, c=c: r[c] != "") for c in NOT_NULL_FOR_USAGE],
    *[(f"{c} null (not supported)", "all", lambda r: True, lambda r, c=c: r[c] == "") for c in NULL_UNSUPPORTED],
    *[(f"{c} allowed value", "all", lambda r: True, lambda r, c=c, ok=ok: r[c] in ok) for c, ok in ALLOWED.items()],
    *[(f"{c} NumericFormat", "all", lambda r, c=c: r[c] != "", lambda r, c=c: bool(DECIMAL_RE.match(r[c]))) for c in DECIMALS],
    *[(f"{c} DateTimeFormat", "all", lambda r: True, lambda r, c=c: bool(DATETIME_RE.match(r[c])))
      for c in ("BillingPeriodStart", "BillingPeriodEnd", "ChargePeriodStart", "ChargePeriodEnd")],
    ("ChargePeriodStart < ChargePeriodEnd", "all", lambda r: True, lambda r: r["ChargePeriodStart"] < r["ChargePeriodEnd"]),
    ("charge period within the billing period", "all", lambda r: True,
     lambda r: r["BillingPeriodStart"] <= r["ChargePeriodStart"] and r["ChargePeriodEnd"] <= r["BillingPeriodEnd"]),
    ("BillingPeriodStart < BillingPeriodEnd", "all", lambda r: True, lambda r: r["BillingPeriodStart"] < r["BillingPeriodEnd"]),
    ("BilledCost-C-005-C: 0 when a third party is paid", "all", lambda r: r["ProviderName"] != r["InvoiceIssuerName"],
     lambda r: D(r["BilledCost"]) == 0),
    ("BilledCost 0 unless ServiceProviderName is the issuer", "1.3",
     lambda r: r["ServiceProviderName"] != r["InvoiceIssuerName"], lambda r: D(r["BilledCost"]) == 0),
    ("ListCost = ListUnitPrice x PricingQuantity", "all", lambda r: r["ListUnitPrice"] != "" and r["PricingQuantity"] != "",
     lambda r: _product(r, "ListUnitPrice", "ListCost")),
    ("ContractedCost = ContractedUnitPrice x PricingQuantity", "all",
     lambda r: r["ContractedUnitPrice"] != "" and r["PricingQuantity"] != "", lambda r: _product(r, "ContractedUnitPrice", "ContractedCost")),
    ("unit prices non-negative", "all", lambda r: r["ListUnitPrice"] != "",
     lambda r: D(r["ListUnitPrice"]) >= 0 and D(r["ContractedUnitPrice"]) >= 0),
    ("PricingCurrency* equal the billing-currency columns (one currency)", "all", lambda r: True,
     lambda r: (r["PricingCurrencyEffectiveCost"], r["PricingCurrencyListUnitPrice"], r["PricingCurrencyContractedUnitPrice"])
     == (r["EffectiveCost"], r["ListUnitPrice"], r["ContractedUnitPrice"])),
    ("ConsumedUnit null iff ConsumedQuantity null", "all", lambda r: True,
     lambda r: (r["ConsumedUnit"] == "") == (r["ConsumedQuantity"] == "")),
    ("PricingUnit null iff PricingQuantity null", "all", lambda r: True,
     lambda r: (r["PricingUnit"] == "") == (r["PricingQuantity"] == "")),
    ("ServiceSubcategory belongs to ServiceCategory", "all", lambda r: True,
     lambda r: r["ServiceSubcategory"] in SERVICE_SUBCATEGORIES.get(r["ServiceCategory"], ())),
    ("Tags is a JSON object", "all", lambda r: r["Tags"] != "", lambda r: _json_object(r["Tags"])),
    ("SkuPriceDetails: JSON object, custom keys x_", "all", lambda r: r["SkuPriceDetails"] != "",
     lambda r: _json_object(r["SkuPriceDetails"]) and all(k.startswith("x_") for k in json.loads(r["SkuPriceDetails"]))),
    *[(f"{c} not null", "1.3", lambda r: True, lambda r, c=c: r[c] != "") for c in ("ServiceProviderName", "HostProviderName")],
    ("ProviderName is ServiceProviderName (deprecated alias)", "1.3", lambda r: True,
     lambda r: r["ProviderName"] == r["ServiceProviderName"]),
    ("ContractApplied null without contract commitments", "1.3", lambda r: True, lambda r: r["ContractApplied"] == ""),
    *[(f"{c} null unless split cost allocation", "1.3", lambda r: r["AllocatedMethodId"] == "", lambda r, c=c: r[c] == "")
      for c in ALLOCATION],
    ("AllocatedMethodDetails has Elements with AllocatedRatio", "1.3", lambda r: r["AllocatedMethodId"] != "",
     lambda r: all("AllocatedRatio" in e for e in json.loads(r["AllocatedMethodDetails"], parse_float=D)["Elements"])),
    ("AllocatedTags: no key already in Tags", "1.3", lambda r: r["AllocatedTags"] != "",
     lambda r: not set(json.loads(r["AllocatedTags"])) & set(json.loads(r["Tags"] or "{}"))),
]


def check_rules(rows: list[dict[str, str]], version: str) -> dict[str, int]:
    """Every rule on every row; returns how many rows each rule applied to (so a test sees it ran)."""
    applied: dict[str, int] = defaultdict(int)
    for r in rows:
        for name, versions, condition, requirement in RULES:
            if versions in ("all", version) and condition(r):
                applied[name] += 1
                assert requirement(r), (name, {k: v for k, v in r.items() if v})
    return applied


def _focus_csv(cli, tmp_path, *args: str, since: str = SINCE, until: str = UNTIL, version: str = "1.3") -> list[dict[str, str]]:
    out = tmp_path / f"focus-{since}-{until}-{version}.csv"
    cli("report", "focus", "--out", str(out), "--since", since, "--until", until, *args)
    with open(out, newline="") as fh:
        reader = csv.DictReader(fh)
        rows = list(reader)
        header = reader.fieldnames
    focus_cols = [c for c in header if not c.startswith("x_")]
    assert focus_cols == (FOCUS_13 if version == "1.3" else FOCUS_12)  # every column, spec order, nothing else unprefixed
    assert header[:len(focus_cols)] == focus_cols  # x_ columns come after FOCUS's
    assert {"x_SessionId", "x_AgentId", "x_GpuSeconds", "x_TokenType"} <= set(header)
    return rows


@pytest.mark.parametrize("version", ["1.3", "1.2"])
def test_focus_export_meets_every_applicable_rule_and_adds_up_exactly(cli, truth, tmp_path, version):
    args = ("--focus-version", "1.2") if version == "1.2" else ()
    rows = _focus_csv(cli, tmp_path, *args, version=version)
    applied = check_rules(rows, version)
    assert applied["BilledCost-C-005-C: 0 when a third party is paid"] > 0 and applied["ListCost = ListUnitPrice x PricingQuantity"] == len(rows)
    events = truth["events"]
    gpu_cost = sum((c for s, _, c in truth["gpu"] if s.level == "process"), ZERO)
    gpu_cost += sum((cpu + mem for _, cpu, mem in truth["compute"]), ZERO)  # node CPU and memory: billed like GPU time
    # EffectiveCost is the showback: it adds up to the ledger exactly; BilledCost is only what the issuer invoices (GPU time)
    assert sum(D(r["EffectiveCost"]) for r in rows) == sum((e.cost_usd for e in events), ZERO) + gpu_cost
    internal = sum((e.cost_usd for e in events if not e.provider), ZERO)  # calls with no seller named: the account's own
    assert sum(D(r["BilledCost"]) for r in rows) == gpu_cost + internal and internal > 0
    third_party = [r for r in rows if r["ProviderName"] in ("openai", "anthropic")]
    assert third_party and all(r["InvoiceIssuerName"] == "meterline" and D(r["BilledCost"]) == 0 for r in third_party)
    assert {r["InvoiceId"] for r in rows} == {f"meterline/{NOW:%Y-%m}"} or NOW.day == 1  # one provisional invoice a month
    # list cost: catalog rate x quantity, which for catalog-priced tokens is the pricer's list cost to the pico-dollar
    assert sum(D(r["ListCost"]) for r in rows if r["x_Kind"] not in ("gpu", "cpu", "memory")) == sum((e.list_cost_usd for e in events), ZERO)
    # cached and uncached tokens are separate rows, with their own quantities
    by_type = defaultdict(Decimal)
    for r in rows:
        by_type[r["x_TokenType"]] += D(r["ConsumedQuantity"])
    llm = [e for e in events if e.kind == "llm_call"]
    assert by_type["cache_read"] == sum(e.cache_read_tokens for e in llm)
    assert by_type["cache_write"] == sum(e.cache_write_tokens for e in llm)
    assert by_type["input"] == sum(e.input_tokens - e.cache_read_tokens - e.cache_write_tokens for e in llm)
    gpu_rows = [r for r in rows if r["ConsumedUnit"] == "GPU-Hours"]
    assert sum(D(r["x_GpuSeconds"]) for r in gpu_rows) == sum((sec for s, sec, _ in truth["gpu"] if s.level == "process"), ZERO)


def test_focus_list_unit_price_is_the_catalog_rate(cli, truth, tmp_path):
    rows = _focus_csv(cli, tmp_path)
    gpu = [r for r in rows if r["x_Kind"] == "gpu"]
    assert gpu and {r["ListUnitPrice"] for r in gpu} == {"2.49"}  # the catalog's H100 $/hour, not cost / hours
    for r in gpu:  # list = 2.49 x hours exactly; the ledger's per-sample rounding stays under a nano-dollar
        assert abs(D(r["ListCost"]) - D(r["EffectiveCost"])) < D("1e-9") and D(r["BilledCost"]) == D(r["EffectiveCost"])
    rates = {(r["x_Model"], r["x_TokenType"]): r["ListUnitPrice"] for r in rows if r["x_Model"] == "gpt-4o"}
    assert rates[("gpt-4o", "input")] == "0.0000025" and rates[("gpt-4o", "output")] == "0.00001"  # $2.50 / $10 per Mtok
    assert {r["ListUnitPrice"] for r in rows if r["x_Tool"] == "web_search"} == {
        exact_str(CATALOG.tool_unit_price("web_search", "", NOW))}


def test_focus_prices_node_cpu_and_memory_as_their_own_skus_and_units(cli, truth, tmp_path):
    rows = _focus_csv(cli, tmp_path)
    cpu = [r for r in rows if r["x_Kind"] == "cpu"]
    memory = [r for r in rows if r["x_Kind"] == "memory"]
    assert {(r["SkuMeter"], r["ConsumedUnit"], r["PricingUnit"], r["ListUnitPrice"], r["SkuId"]) for r in cpu} == {
        ("vCPU-Hours", "vCPU-Hours", "vCPU-Hours", "0.031611", "compute/n2/cpu")}  # the catalog's n2 rates
    assert {(r["SkuMeter"], r["ListUnitPrice"], r["SkuId"]) for r in memory} == {("GiB-Hours", "0.004237", "compute/n2/memory")}
    compute = truth["compute"]
    # quantities are rounded so that rate x quantity is exact in 18 places (priced_quantity): within 1e-11 per row
    cpu_hours = sum((s.cpu_seconds for s, _, _ in compute), ZERO) / 3600
    gib_hours = sum((s.memory_byte_seconds for s, _, _ in compute), ZERO) / (3600 << 30)
    assert abs(sum(D(r["ConsumedQuantity"]) for r in cpu) - cpu_hours) < D("1e-11") * len(cpu) and cpu_hours > 0
    assert abs(sum(D(r["ConsumedQuantity"]) for r in memory) - gib_hours) < D("1e-11") * len(memory) and gib_hours > 0
    assert sum(D(r["EffectiveCost"]) for r in cpu) == sum((c for _, c, _ in compute), ZERO)
    assert sum(D(r["EffectiveCost"]) for r in memory) == sum((m for _, _, m in compute), ZERO)
    assert {r["SubAccountId"] for r in cpu} == {"acme", STREAM_UNATTRIBUTED}  # nobody's process: kept, on its own line


def exact_str(value: Decimal) -> str:
    return format(value.normalize(), "f")


def test_unpriced_usage_says_why(cli, truth, tmp_path):
    rows = [r for r in _focus_csv(cli, tmp_path) if r["x_CostSource"] == "unpriced"]
    assert rows and sum(1 for e in truth["events"] if e.cost_source == "unpriced") > 0
    for r in rows:
        assert r["ChargeDescription"].startswith("unpriced: no catalog price for model in-house-7b"), r["ChargeDescription"]
        assert D(r["EffectiveCost"]) == D(r["ListCost"]) == 0
    priced = [r for r in _focus_csv(cli, tmp_path) if r["x_CostSource"] != "unpriced"]
    assert not any("unpriced" in r["ChargeDescription"] for r in priced)


def test_adjacent_exports_never_share_a_charge_period(cli, truth, tmp_path):
    cut = NOW - timedelta(minutes=29, seconds=17)
    if cut.minute == cut.second == 0:
        cut -= timedelta(minutes=1)  # the cut must fall mid-hour
    cut_s = cut.isoformat()
    before = _focus_csv(cli, tmp_path, since=SINCE, until=cut_s)
    after = _focus_csv(cli, tmp_path, since=cut_s, until=UNTIL)
    whole = _focus_csv(cli, tmp_path)
    stamp = cut.strftime("%Y-%m-%dT%H:%M:%SZ")
    assert before and after
    assert max(r["ChargePeriodEnd"] for r in before) == stamp == min(r["ChargePeriodStart"] for r in after)
    assert {r["ChargePeriodStart"] for r in before}.isdisjoint({r["ChargePeriodStart"] for r in after})
    assert all(r["ChargePeriodStart"] >= datetime.fromisoformat(SINCE).strftime("%Y-%m-%dT%H:%M:%SZ") for r in whole)
    assert sum(D(r["EffectiveCost"]) for r in before + after) == sum(D(r["EffectiveCost"]) for r in whole)
    check_rules(before + after, "1.3")


def _idle(**kw):
    line = dict(hour=datetime(2026, 3, 4, 10, tzinfo=timezone.utc), period_end=datetime(2026, 3, 4, 11, tzinfo=timezone.utc),
                node="node-1", gpu_uuid="GPU-aaaa", mig_uuid="", gpu_name="NVIDIA H100 80GB HBM3", tenant_id="acme",
                team="search", project="p0", gpu_seconds=D("1200"), cost_usd=D("0.83"), policy="proportional",
                catalog_version="test-1", list_rate_per_hour=D("2.49"))
    return line | kw


def _as_csv_cells(rows):  # the builder's rows as the CSV writer renders them
    from meterline.app.focus import _csv_value

    return [{c: ("" if v is None else str(_csv_value(v))) for c, v in {col: r.get(col) for col in FOCUS_13}.items()} for r in rows]


def test_idle_allocation_rows_carry_focus_13_allocation_columns():
    lines = [_idle(tenant_id="acme", gpu_seconds=D("1200"), cost_usd=D("0.83")),
             _idle(tenant_id="globex", team="support", gpu_seconds=D("600"), cost_usd=D("0.415")),
             _idle(tenant_id="initech", gpu_seconds=D("1"), cost_usd=D("0.000691666667")),
             _idle(policy="owner", gpu_uuid="GPU-bbbb", mig_uuid="MIG-1", gpu_seconds=D("3600"), cost_usd=D("0.355714285714")),
             _idle(policy="separate", gpu_uuid="GPU-cccc", tenant_id="", team="", project="", cost_usd=D("2.49"),
                   gpu_seconds=D("3600"))]
    rows = list(idle_rows(lines, "meterline"))
    cells = _as_csv_cells(rows)
    check_rules(cells, "1.3")
    assert [r["AllocatedMethodId"] for r in rows] == ["proportional"] * 3 + ["owner", "separate"]
    details = [json.loads(r["AllocatedMethodDetails"], parse_float=D) for r in rows]
    ratios = [d["Elements"][0]["AllocatedRatio"] for d in details]
    assert sum(ratios[:3]) == 1 and ratios[3] == ratios[4] == 1  # one origin charge per device-hour, shares add to 1
    assert abs(ratios[0] - 2 * ratios[1]) <= D("1e-17")  # shares of the cost; the rounding remainder on the largest
    assert not any(isinstance(x, float) for x in ratios)  # exact numbers in the JSON (parse_float=Decimal), never floats
    assert details[0]["Elements"][0]["UsageUnit"] == "GPU-Seconds" and details[0]["Elements"][0]["UsageQuantity"] == 1200
    assert details[0]["x_Policy"] == "proportional" and "split over the tenants" in details[0]["x_Rule"]
    assert rows[0]["AllocatedResourceId"] == "node-1/GPU-aaaa" and rows[3]["AllocatedResourceId"] == "node-1/GPU-bbbb/MIG-1"
    assert rows[4]["AllocatedResourceId"] is None and rows[4]["AllocatedResourceName"] is None  # the unallocated portion
    assert rows[4]["SubAccountId"] == STREAM_UNATTRIBUTED
    assert json.loads(rows[1]["AllocatedTags"]) == {"team": "support", "project": "p0"}
    for r, line in zip(rows, lines):
        assert r["EffectiveCost"] == r["BilledCost"] == line["cost_usd"]  # the account's own GPUs: it bills them
        assert r["ListUnitPrice"] == D("2.49") and r["ListCost"] == r["ListUnitPrice"] * r["PricingQuantity"]
        assert (r["ChargePeriodStart"], r["ChargePeriodEnd"]) == (line["hour"], line["period_end"])
    with pytest.raises(ValueError, match="unknown GPU idle policy"):
        list(idle_rows([_idle(policy="evenly")], "meterline"))


def test_idle_lines_reach_the_export_clipped_to_its_window(truth):
    params = ReportParams.parse(since=SINCE, until=UNTIL)
    line = _idle(hour=NOW.replace(minute=0, second=0) - timedelta(hours=2), period_end=NOW.replace(minute=0, second=0) - timedelta(hours=1))
    client = ledger.connect(truth["settings"])
    try:
        store = DirectLedger(truth["settings"], client)
        plain, with_idle = focus_rows(store, params), focus_rows(store, params, idle_lines=[line])
        old = focus_rows(store, params, version="1.2", idle_lines=[line])
    finally:
        client.close()
        gc.collect()
    (extra,) = [r for r in with_idle if r["AllocatedMethodId"]]
    assert len(with_idle) == len(plain) + 1 and not any(r["AllocatedMethodId"] for r in plain)
    assert extra["ChargePeriodStart"] == max(line["hour"], params.since)
    assert "AllocatedMethodId" not in old[0] and len(old) == len(with_idle)  # 1.2 has no allocation columns


def test_focus_parquet_has_decimal_money_and_the_same_total(cli, truth, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    for version, want_cols in (("1.3", FOCUS_13), ("1.2", FOCUS_12)):
        out = tmp_path / f"focus-{version}.parquet"
        cli("report", "focus", "--format", "parquet", "--out", str(out), "--since", SINCE, "--until", UNTIL, "--focus-version", version)
        table = pq.read_table(out)
        assert [n for n in table.schema.names if not n.startswith("x_")] == want_cols
        assert table.schema.metadata[b"focus_version"] == version.encode()
        for col in ("BilledCost", "EffectiveCost", "ListCost", "ConsumedQuantity", "ListUnitPrice"):
            assert table.schema.field(col).type == pa.decimal128(38, 18)
        assert table.schema.field("ChargePeriodStart").type == pa.timestamp("ms", tz="UTC")
        gpu_cost = sum((c for s, _, c in truth["gpu"] if s.level == "process"), ZERO)
        total = sum((e.cost_usd for e in truth["events"]), ZERO) + gpu_cost + sum((c + m for _, c, m in truth["compute"]), ZERO)
        assert sum(table.column("EffectiveCost").to_pylist(), ZERO) == total


def test_focus_version_flag_refuses_unknown_versions(truth, monkeypatch, tmp_path):
    monkeypatch.setenv("METERLINE_CLICKHOUSE_DSN", truth["settings"].dsn)
    get_settings.cache_clear()
    result = CliRunner().invoke(app, ["report", "focus", "--out", str(tmp_path / "x.csv"), "--focus-version", "1.1"])
    get_settings.cache_clear()
    assert result.exit_code == 1 and "--focus-version must be one of 1.3, 1.2" in result.output  # as --format's check
    assert not (tmp_path / "x.csv").exists()


def test_split_of_a_provider_cost_adds_up_exactly():
    from meterline.app.focus import split_billed

    parts = split_billed(Decimal("0.000000000000000007"), [Decimal("1"), Decimal("1"), Decimal("1")])
    assert sum(parts, ZERO) == Decimal("0.000000000000000007") and all(p >= 0 for p in parts)
    assert split_billed(Decimal("3"), [ZERO, ZERO]) == [Decimal("3"), ZERO]


def test_budget_periods_follow_the_policy_zone():
    now = datetime(2025, 3, 30, 12, tzinfo=timezone.utc)  # Europe/Berlin switches to summer time this day
    start, end = period_bounds("day", "Europe/Berlin", now)
    assert (start, end) == (datetime(2025, 3, 29, 23, tzinfo=timezone.utc), datetime(2025, 3, 30, 22, tzinfo=timezone.utc))
    start, end = period_bounds("month", "UTC", now)
    assert (start, end) == (datetime(2025, 3, 1, tzinfo=timezone.utc), datetime(2025, 4, 1, tzinfo=timezone.utc))
    start, _ = period_bounds("week", "UTC", now)
    assert start == datetime(2025, 3, 24, tzinfo=timezone.utc)


@hsettings(max_examples=200, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(since=st.one_of(st.none(), st.text(max_size=30)), by=st.one_of(st.none(), st.text(max_size=12)),
       limit=st.one_of(st.none(), st.integers(-5, 10**6).map(str), st.text(max_size=5)))
def test_bad_report_parameters_raise_only_value_errors(since, by, limit):
    try:
        params = ReportParams.parse(since=since, by=by, limit=limit)
    except ValueError:
        return
    assert params.by in DIMS and params.since < params.until and 0 < params.limit


def test_unattributed_gpu_time_has_the_stream_tenant_name_in_every_report(cli, truth, tmp_path):
    """A user reconciling the stream's spend with chargeback sees one tenant name for it."""
    unattributed = sum((c for s, _, c in truth["gpu"] if s.level == "process" and not s.tenant_id), ZERO)
    assert unattributed > 0
    doc = json.loads(cli("report", "chargeback", "--tenant", STREAM_UNATTRIBUTED, "--since", SINCE, "--until", UNTIL, "-f", "json"))
    assert [(r["tenant"], Decimal(r["gpu_cost_usd"]), Decimal(r["usage_cost_usd"])) for r in doc["rows"]] \
        == [(STREAM_UNATTRIBUTED, unattributed, ZERO)]
    table = cli("report", "chargeback", "--since", SINCE, "--until", UNTIL)
    assert STREAM_UNATTRIBUTED in table and "(none)" not in table
    gpu_lines = [r for r in _focus_csv(cli, tmp_path) if r["ConsumedUnit"] == "GPU-Hours" and not r["x_SessionId"]]
    assert gpu_lines and {(r["SubAccountId"], r["SubAccountName"]) for r in gpu_lines} == {(STREAM_UNATTRIBUTED,) * 2}
    assert sum(Decimal(r["BilledCost"]) for r in gpu_lines) == unattributed

    from meterline.app.api import ApiServer  # the dashboard's API serves the same report

    api = ApiServer(lambda: DirectLedger(truth["settings"], ledger.connect(truth["settings"])), port=0)
    api.start()
    try:
        rows = httpx.get(f"{api.url}/api/report/chargeback", params={"since": SINCE, "until": UNTIL}).json()["rows"]
    finally:
        api.stop()
        gc.collect()
    assert STREAM_UNATTRIBUTED in {r[0] for r in rows} and "" not in {r[0] for r in rows}


def test_on_a_cluster_every_report_reads_the_all_tables_and_agrees(truth):
    """No ClickHouse cluster can run here, so this is not a cluster test: it checks that the
    cluster rendering of every report runs and reads only `_all` tables. The stand-ins are
    Merge tables over the local ones (the same structure, as the real Distributed tables
    have), alone in a database of their own with the ledger's views as rendered for the cluster, so a report
    reading a plain name fails."""
    s = truth["settings"]
    local = ledger.connect(s)
    home = local.query("SELECT currentDatabase()").result_rows[0][0]
    alone = ledger.connect(s, database="cluster_reads")
    rendered = "\n".join(ledger.render_for_cluster(m.sql, "prod") for m in ledger.load_migrations())
    for name in re.findall(r"CREATE TABLE IF NOT EXISTS (\w+)_all ON CLUSTER", rendered):
        alone.command(f"CREATE TABLE IF NOT EXISTS {name}_all AS {home}.{name} ENGINE = Merge({home}, '^{name}$')")
    for view in [v for m in ledger.load_migrations() for v in m.statements("prod") if v.startswith("CREATE VIEW")]:
        alone.command(view.replace(" ON CLUSTER 'prod'", ""))  # as rendered for the cluster: over the `_all` tables
    single = DirectLedger(s, local)
    cluster = DirectLedger(Settings(**{**s.model_dump(), "clickhouse_cluster": "prod"}), alone)
    params = ReportParams.parse(since=SINCE, until=UNTIL, by="model")
    try:
        for name in REPORTS:
            want = run_report(single, name, params).rows
            assert (want or name == "strategies") and run_report(cluster, name, params).rows == want, name  # no stored run here
        assert burn_down(cluster, params, now=NOW).rows == burn_down(single, params, now=NOW).rows
        from meterline.app.forecast import forecast_report

        want = forecast_report(single, "team", now=NOW).rows
        assert want and forecast_report(cluster, "team", now=NOW).rows == want  # the rollups' _all tables
        assert focus_rows(cluster, params) == focus_rows(single, params)
        with pytest.raises(Exception, match="(?i)unknown table|doesn't exist|does not exist"):
            alone.query("SELECT count() FROM priced_events")  # plain names are not there: the check can fail
        assert cluster.query("SELECT count() FROM priced_events").rows == [(len(truth["events"]),)]  # the API's SQL too
    finally:
        alone.close()
        local.close()
        gc.collect()


@pytest.mark.parametrize("filters", [{"tenant": ""}, {"team": " "}, {"project": ""}])
def test_an_empty_filter_is_refused_not_read_as_every_value(filters):
    with pytest.raises(ValueError, match="is empty; leave it out"):
        ReportParams.parse(since="1d", **filters)
    assert ReportParams.parse(since="1d").as_query().keys() == {"since", "until", "by", "limit", "gpu_idle"}  # unset filters stay unset
