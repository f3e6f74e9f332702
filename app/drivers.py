"""Cost drivers: why spend moved between two periods, in USD per driver, summing exactly to the change.

The identity, per group (a tenant, `acme/research`, `acme/agent-1`) and period:

    cost = N · Σ_m c_m · [ i_m · ((1 − h_m − w_m)·rU_m + w_m·rW_m + h_m·rR_m) + o_m·rO_m + a_m ]   LLM calls
         + tool/API cost + GPU cost

N LLM calls; c_m the share of them on model m; i_m, o_m input and output tokens per call; h_m, w_m
the shares of input read from / written to the cache; rU, rW, rR, rO USD per uncached-input,
cache-write, cache-read and output token (from the ledger's price components); a_m USD per call
the components do not explain (a provider-reported price that differs from the catalog's).
With these definitions the identity reproduces each period's ledger cost exactly.

Drivers: call volume (N), model mix (c), tokens per call (i, o: context and answer length),
cache hit rate (h, w), unit price (r, a: a catalog or provider price change), tool/API calls and
GPU time (additive terms: each is its own change). The LLM change is split by **Shapley values**
over the five LLM factors: a factor's USD is its marginal effect averaged over every order of
switching factors from the previous to the current period, so no arbitrary order favours one
driver, and the values add up to the change by construction. Arithmetic is exact (Fraction);
the values are rounded to the ledger's 18 places by largest remainder, so the columns sum to
the ledger change to the last digit.

A model (or a whole group) present in one period only takes its per-call factors from the
other period: its appearance is then all model mix (or call volume), never a phantom price.
"""
from __future__ import annotations

import json
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from decimal import Decimal, localcontext
from fractions import Fraction
from itertools import combinations
from math import factorial
from typing import Any

from .report import _RELATIVE, _UNITS, UNATTRIBUTED, Querier, ReportParams, exact, load_query, parse_when
from .store import Result

LEVELS = ("tenant", "team", "agent")
LLM_FACTORS = ("call_volume", "model_mix", "tokens_per_call", "cache_hit_rate", "unit_price")
DRIVERS = (*LLM_FACTORS, "tool_calls", "gpu_time")
COLUMNS = ["previous_usd", *(f"{d}_usd" for d in DRIVERS), "current_usd", "change_usd"]
MONEY = "Decimal(38, 18)"
QUANTUM = Fraction(1, 10**18)  # the ledger's scale: Decimal(38, 18)
CLASSES = ("U", "W", "R", "O")  # uncached input, cache write, cache read, output
RATES = tuple(f"r{k}" for k in CLASSES)
PREVIOUS, CURRENT = 0, 1


# ---- periods ------------------------------------------------------------------------------------


def period_params(period: str | None = None, since: Any = None, until: Any = None, by: str | None = None,
                  now: datetime | None = None, **filters: Any) -> ReportParams:
    """The current period: --period (7d, 24h; ending at --until or now) or --since/--until; default 7d."""
    if period and since:
        raise ValueError("give --period or --since, not both")
    if by not in (None, *LEVELS):
        raise ValueError(f"--by must be one of {', '.join(LEVELS)} for drivers, not {by!r}")
    if since is None:
        m = _RELATIVE.match((period or "7d").strip())
        if not m:
            raise ValueError(f"--period must look like 7d, 24h or 2w, not {period!r}")
        now = now or datetime.now(timezone.utc)
        end = parse_when(until, now) or now + timedelta(seconds=1)  # `now` included, as in every report
        since, until = end - timedelta(**{_UNITS[m.group(2)]: int(m.group(1))}), end
    return ReportParams.parse(since=since, until=until, by=by, now=now, **filters)


def previous_since(params: ReportParams) -> datetime:
    """The previous period has the current one's length and ends where it starts."""
    return params.since - (params.until - params.since)


# ---- the ledger's numbers -------------------------------------------------------------------------


@dataclass
class Side:
    """One group in one period: LLM figures per model, and the additive terms."""

    models: dict[tuple[str, str], dict[str, int | Decimal]] = field(default_factory=dict)
    tool: Decimal = Decimal(0)
    gpu: Decimal = Decimal(0)

    def llm(self) -> Decimal:
        return sum((m["cost_usd"] for m in self.models.values()), Decimal(0))

    def total(self) -> Decimal:
        return self.llm() + self.tool + self.gpu


def load(ledger: Querier, params: ReportParams) -> dict[str, tuple[Side, Side]]:
    """drivers.sql's rows as {group: (previous, current)}."""
    if params.by not in LEVELS:
        raise ValueError(f"--by must be one of {', '.join(LEVELS)} for drivers, not {params.by!r}")
    query = {"level": params.by, "prev_since": previous_since(params), "since": params.since, "until": params.until,
             "tenant": params.tenant, "team": params.team, "project": params.project, "unattributed": UNATTRIBUTED}
    groups: dict[str, tuple[Side, Side]] = defaultdict(lambda: (Side(), Side()))
    for row in ledger.query(load_query("drivers"), query).dicts():
        side = groups[row["key"]][CURRENT if row["period"] == "current" else PREVIOUS]
        if row["kind"] == "llm":
            side.models[(row["provider"], row["model"])] = row
        elif row["kind"] == "tool":
            side.tool += row["cost_usd"]
        else:
            side.gpu += row["cost_usd"]
    return dict(groups)


# ---- the identity's factors -----------------------------------------------------------------------


def _ratio(num: Any, den: Any) -> Fraction | None:
    return Fraction(num) / Fraction(den) if den else None


def _tokens(m: dict[str, Any]) -> dict[str, int]:
    """Tokens per price class (cache reads and writes are part of input_tokens)."""
    return {"U": m["input_tokens"] - m["cache_read_tokens"] - m["cache_write_tokens"], "W": m["cache_write_tokens"],
            "R": m["cache_read_tokens"], "O": m["output_tokens"]}


def _profile(m: dict[str, Any]) -> dict[str, Fraction | None]:
    """A model's per-call factors in one period; None where undefined (no such tokens)."""
    calls, inp, tokens = m["calls"], m["input_tokens"], _tokens(m)
    costs = {"U": m["input_cost_usd"], "W": m["cache_write_cost_usd"], "R": m["cache_read_cost_usd"], "O": m["output_cost_usd"]}
    out = {"i": _ratio(inp, calls), "o": _ratio(m["output_tokens"], calls),
           "h": _ratio(tokens["R"], inp), "w": _ratio(tokens["W"], inp)}
    out.update({f"r{k}": _ratio(costs[k], tokens[k]) for k in CLASSES})
    return out


def _residual(m: dict[str, Any], f: dict[str, Fraction]) -> Fraction | None:
    """a: USD per call that the rates do not explain, so the identity gives the ledger's cost exactly."""
    explained = sum((n * f[f"r{k}"] for k, n in _tokens(m).items()), Fraction(0))
    return (Fraction(m["cost_usd"]) - explained) / m["calls"]


def _first(*values: Fraction | None) -> Fraction:
    return next((v for v in values if v is not None), Fraction(0))


def factors(prev: Side, cur: Side) -> list[dict[str, Any]]:
    """Per period: N, and per model c, i, o, h, w, rU..rO, a. A value undefined in one period
    (the model is absent, or has no such tokens) is the other period's, so it moves no driver."""
    models = sorted(set(prev.models) | set(cur.models))
    sides = [[side.models.get(m) for m in models] for side in (prev, cur)]
    n = [sum(r["calls"] for r in side if r) for side in sides]
    raw = [[{**_profile(r), "c": _ratio(r["calls"], n[p])} if r else {"c": _ratio(0, n[p])} for r in sides[p]]
           for p in (PREVIOUS, CURRENT)]
    out = [{"N": Fraction(n[p]), "models": []} for p in (PREVIOUS, CURRENT)]
    for j in range(len(models)):
        pair = [raw[PREVIOUS][j], raw[CURRENT][j]]
        filled = [{k: _first(pair[p].get(k), pair[1 - p].get(k)) for k in ("c", "i", "o", "h", "w", *RATES)}
                  for p in (PREVIOUS, CURRENT)]
        a = [_residual(sides[p][j], filled[p]) if sides[p][j] else None for p in (PREVIOUS, CURRENT)]
        for p in (PREVIOUS, CURRENT):
            out[p]["models"].append({**filled[p], "a": _first(a[p], a[1 - p])})
    return out


def per_call(f: list[dict[str, Any]], tok: int, cache: int, price: int) -> list[Fraction]:
    """USD per call of each model, with tokens per call, cache shares and prices from the periods named."""
    out = []
    for t, h, r in zip(f[tok]["models"], f[cache]["models"], f[price]["models"]):
        per_input = (1 - h["h"] - h["w"]) * r["rU"] + h["w"] * r["rW"] + h["h"] * r["rR"]
        out.append(t["i"] * per_input + t["o"] * r["rO"] + r["a"])
    return out


def llm_cost(f: list[dict[str, Any]], pick: dict[str, int], terms: dict | None = None) -> Fraction:
    """The identity with each factor taken from the period `pick` names (PREVIOUS or CURRENT)."""
    key = (pick["tokens_per_call"], pick["cache_hit_rate"], pick["unit_price"])
    calls = terms[key] if terms is not None else per_call(f, *key)
    mix = f[pick["model_mix"]]["models"]
    return f[pick["call_volume"]]["N"] * sum((m["c"] * x for m, x in zip(mix, calls)), Fraction(0))


def shapley(f: list[dict[str, Any]]) -> dict[str, Fraction]:
    """Each LLM factor's exact Shapley value: its marginal effect averaged over all orders."""
    n = len(LLM_FACTORS)
    terms = {(t, h, r): per_call(f, t, h, r) for t in (0, 1) for h in (0, 1) for r in (0, 1)}  # reused by 32 subsets
    cost = {s: llm_cost(f, {k: CURRENT if k in s else PREVIOUS for k in LLM_FACTORS}, terms)
            for size in range(n + 1) for s in map(frozenset, combinations(LLM_FACTORS, size))}
    out = {}
    for k in LLM_FACTORS:
        others = [s for s in cost if k not in s]
        out[k] = sum((Fraction(factorial(len(s)) * factorial(n - len(s) - 1), factorial(n)) * (cost[s | {k}] - cost[s])
                      for s in others), Fraction(0))
    return out


def round_to_ledger(values: dict[str, Fraction], total: Decimal) -> dict[str, Decimal]:
    """Round to 18 places so that the parts still sum to `total` exactly (largest remainder)."""
    units = {k: v / QUANTUM for k, v in values.items()}
    floors = {k: u.numerator // u.denominator for k, u in units.items()}
    whole = Fraction(total) / QUANTUM
    assert whole.denominator == 1, f"{total} has more than 18 decimal places"
    short = int(whole) - sum(floors.values())  # 0 <= short < len(values): the parts sum to total exactly
    for k in sorted(units, key=lambda k: units[k] - floors[k], reverse=True)[:short]:
        floors[k] += 1
    return {k: Decimal(f"{v}E-18") for k, v in floors.items()}  # from text: exact at any size


# ---- the report -----------------------------------------------------------------------------------


def decompose(prev: Side, cur: Side) -> dict[str, Decimal]:
    """One group's drivers in USD; they sum to cur.total() - prev.total() exactly."""
    with localcontext(prec=80):  # Decimal(38, 18) differences exceed the default 28 digits
        llm_change = cur.llm() - prev.llm()
        parts = round_to_ledger(shapley(factors(prev, cur)), llm_change) if prev.models or cur.models else \
            dict.fromkeys(LLM_FACTORS, Decimal(0))
        return {**parts, "tool_calls": cur.tool - prev.tool, "gpu_time": cur.gpu - prev.gpu}


def drivers_report(ledger: Querier, params: ReportParams) -> Result:
    rows = []
    with localcontext(prec=80):  # Decimal(38, 18) sums exceed the default 28 digits: never round money
        for key, (prev, cur) in load(ledger, params).items():
            parts = decompose(prev, cur)
            before, after = prev.total(), cur.total()
            rows.append((key, before, *(parts[d] for d in DRIVERS), after, after - before))
    rows.sort(key=lambda r: (-abs(r[-1]), r[0]))
    return Result([params.by, *COLUMNS], ["String", *[MONEY] * len(COLUMNS)], rows)


def to_json_doc(params: ReportParams, result: Result) -> dict[str, Any]:
    return {"report": "drivers", "since": params.since.isoformat(), "until": params.until.isoformat(),
            "previous": {"since": previous_since(params).isoformat(), "until": params.since.isoformat()},
            "drivers": list(DRIVERS), "rows": [{k: exact(v) for k, v in row.items()} for row in result.dicts()]}


def render(params: ReportParams, result: Result, fmt: str) -> Any:
    """json / csv text, or a rich Table for people."""
    from .report import to_csv

    if fmt == "json":
        return json.dumps(to_json_doc(params, result))
    if fmt == "csv":
        return to_csv(result)  # user text through csv_text: no formula cells
    return _table(params, result)


HEADERS = {"previous_usd": "before $", "call_volume_usd": "calls", "model_mix_usd": "mix", "tokens_per_call_usd": "tok/call",
           "cache_hit_rate_usd": "cache", "unit_price_usd": "price", "tool_calls_usd": "tools", "gpu_time_usd": "GPU",
           "current_usd": "after $", "change_usd": "change $"}


def _table(params: ReportParams, result: Result) -> Any:
    from rich.table import Table
    from rich.text import Text

    prev = previous_since(params)
    title = (f"drivers · {params.since:%Y-%m-%d %H:%M} → {params.until:%Y-%m-%d %H:%M} UTC vs "
             f"{prev:%Y-%m-%d %H:%M} → {params.since:%Y-%m-%d %H:%M}")
    with localcontext(prec=80):
        totals = [sum((r[i] for r in result.rows), Decimal(0)) for i in range(1, len(COLUMNS) + 1)]
    # a driver that moved nothing anywhere is left out (named in the caption): 80 columns are few
    idle = {c for i, c in enumerate(COLUMNS, 1) if c.removesuffix("_usd") in DRIVERS and all(r[i] == 0 for r in result.rows)}
    shown = [(i, c) for i, c in enumerate(COLUMNS, 1) if c not in idle]
    caption = f"no change from: {', '.join(HEADERS[c] for c in COLUMNS if c in idle)}" if idle else None
    table = Table(title=title, caption=caption, header_style="bold")
    table.add_column(params.by, overflow="fold", min_width=min(12, max((len(r[0]) for r in result.rows), default=0)))
    cells = [[_money(c, row[i]) for i, c in shown] for row in result.rows]
    total_cells = [_money(c, totals[i - 1]) for i, c in shown]
    for k, (_, col) in enumerate(shown):  # numbers never fold
        table.add_column(HEADERS[col], justify="right", no_wrap=True, min_width=max(len(r[k]) for r in [*cells, total_cells]))
    for row, values in zip(result.rows, cells):  # user text (group names) is Text: shown, never read as markup
        table.add_row(Text(row[0]), *values)
    table.add_section()
    table.add_row(Text("TOTAL"), *total_cells, style="bold")
    return table


def _money(column: str, value: Decimal) -> Any:
    """4 places for people (json/csv stay exact); changes carry their sign."""
    from rich.text import Text

    q = value.quantize(Decimal("0.0001"))
    signed = column not in ("previous_usd", "current_usd") and q
    return Text(f"{q:+,}" if signed else f"{q:,}")
