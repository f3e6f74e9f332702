"""Pricing: the one source of truth for what a usage event or GPU time costs.

Interface (other components call only these names):

    catalog = load_catalog(path=None)          # project catalog + genai-prices, cached per file
    catalog.version -> str                      # stored on every priced row
    catalog.price_usage(event: UsageEvent) -> PricedEvent
    catalog.price_gpu(gpu_name: str, seconds: Decimal, mig_slices: int = 0, mig_total_slices: int = 0)
        -> Decimal                              # exact USD for that GPU time (LookupError: GPU not in catalog)
    catalog.gpu_sample_cost(sample: GpuSample) -> tuple[Decimal, Decimal]   # (gpu_seconds, usd)
    catalog.compute_sample_cost(sample: ComputeSample) -> tuple[Decimal, Decimal]   # (cpu usd, memory usd)
    catalog.downgrade_for(model: str) -> str | None   # a cheaper model of the same task tier

Rules
- LLM prices come from genai-prices (offline snapshot, historic prices by the event's
  timestamp, tiered prices by total input tokens) unless the project catalog
  (streams/catalog.toml) has the (provider, model): custom, self-hosted or negotiated.
- `input_tokens` counts every input token, cache reads and writes included (OpenTelemetry),
  so uncached input = input - cache_read - cache_write. Cache reads and writes are priced at
  their own rates; a model without a cache rate charges those tokens at its input rate
  (what genai-prices does). A per-request fee (`requests_kcount`) is added to input cost.
- Rounding: each component (input, output, cache read, cache write) is rounded to 12
  decimal places with ROUND_HALF_EVEN; the total is the exact sum of the rounded
  components, so components always add up to the total. GPU cost and tool cost are one
  component each, rounded the same way.
- A provider-reported `cost_usd` overrides the catalog (cost_source="provider"); the
  catalog price is still computed into list_cost_usd and the components when possible.
- A model nobody can price is kept at cost 0 with cost_source="unpriced" and counted in
  `catalog.unpriced` (the anomaly detector raises it); never silently free.
- Speed: genai_prices.calc_price costs ~68 µs; here a model's rates are resolved once per
  (provider, model, price period) and cached, then the arithmetic is a few Decimal ops.

All money is Decimal; nothing here touches float.
"""
from __future__ import annotations

import hashlib
import tomllib
from collections import Counter
from dataclasses import dataclass
from datetime import date, datetime, time, timezone
from decimal import ROUND_DOWN, ROUND_HALF_EVEN, Decimal, localcontext
from functools import lru_cache
from pathlib import Path
from typing import Any, NamedTuple

import genai_prices
from genai_prices import data_snapshot
from genai_prices import types as gp

from meterline.errors import CatalogError, first_line
from meterline.settings import get_settings
from meterline.schemas.events import ComputeSample, GpuSample, PricedEvent, UsageEvent, utcnow

DEFAULT_CATALOG = Path(__file__).with_name("catalog.toml")
QUANTUM = Decimal("1e-12")
ZERO = Decimal(0)
MTOK = Decimal(1_000_000)
SECONDS_PER_HOUR = Decimal(3600)
GIB = Decimal(2**30)
EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)

Price = Decimal | gp.TieredPrices
_MISS = object()


def q12(value: Decimal) -> Decimal:
    """Round money to 12 decimal places, banker's rounding (the one rounding rule)."""
    return value.quantize(QUANTUM, rounding=ROUND_HALF_EVEN)


class Rates(NamedTuple):
    """USD per million tokens (Decimal or genai-prices tiered prices) + USD per request; the rest of the
    sheet after per_request (None = not priced apart: those tokens pay their parent's rate, as in
    genai-prices: 1-hour writes the cache write rate, audio/image/reasoning the input/output rate)."""

    input: Price | None
    output: Price | None
    cache_read: Price | None
    cache_write: Price | None
    per_request: Decimal = ZERO
    cache_write_1h: Price | None = None
    input_audio: Price | None = None
    input_image: Price | None = None
    output_audio: Price | None = None
    output_image: Price | None = None
    reasoning: Price | None = None
    web_search: Decimal | None = None  # USD per search (genai-prices: web_searches_kcount / 1000)


TOKEN_RATES = ("input", "output", "cache_read", "cache_write", "cache_write_1h", "input_audio", "input_image",
               "output_audio", "output_image", "reasoning")
# genai-prices price keys of the Rates fields after per_request
SHEET_KEYS = {"cache_write_1h": "cache_write_1h_mtok", "input_audio": "input_audio_mtok", "input_image": "input_image_mtok",
              "output_audio": "output_audio_mtok", "output_image": "output_image_mtok", "reasoning": "output_reasoning_mtok"}


class Components(NamedTuple):
    """Disjoint cost components; the PricedEvent field of each is `<name>_cost_usd`."""

    input: Decimal
    output: Decimal
    cache_read: Decimal
    cache_write: Decimal
    cache_write_1h: Decimal = ZERO
    input_audio: Decimal = ZERO
    input_image: Decimal = ZERO
    output_audio: Decimal = ZERO
    output_image: Decimal = ZERO
    web_search: Decimal = ZERO

    @property
    def total(self) -> Decimal:
        return sum(self, ZERO)


NO_COMPONENTS = Components(ZERO, ZERO, ZERO, ZERO)
# Usage fields beyond the first four components: an event with any of them set is priced on the Decimal path.
SHEET_FIELDS = ("cache_write_1h_tokens", "input_audio_tokens", "input_image_tokens", "output_audio_tokens",
                "output_image_tokens", "web_searches", "service_tier", "batch")


def uses_sheet(event: Any) -> bool:
    """Whether the event needs more of the price sheet than input, output and cache read/write."""
    return bool(event.cache_write_1h_tokens or event.input_audio_tokens or event.input_image_tokens
                or event.output_audio_tokens or event.output_image_tokens or event.web_searches
                or event.batch or event.service_tier not in ("", "default"))


def price_context(event: Any) -> tuple[tuple[str, str], ...]:
    """genai-prices' price context (the keys its price variants are selected by); "default" is the standard price."""
    context = (("processing", "batch"),) if event.batch else ()
    if event.service_tier not in ("", "default"):
        context += (("service_tier", event.service_tier),)
    return context


def _scaled(price: Price | None, factor: Decimal) -> Price | None:
    if price is None or isinstance(price, Decimal):
        return None if price is None else price * factor
    return gp.TieredPrices(price.base * factor, [gp.Tier(t.start, t.price * factor) for t in price.tiers])


def scale_tokens(rates: Rates, factor: Decimal) -> Rates:
    """Every token rate times factor; per-request and per-search fees unchanged (batch discounts are on tokens)."""
    return rates._replace(**{name: _scaled(getattr(rates, name), factor) for name in TOKEN_RATES})


def _start_of(value: Any) -> datetime:
    """A catalog `start` (TOML date/datetime or RFC 3339 string) as an aware UTC datetime."""
    if value is None:
        return EPOCH
    if isinstance(value, str):
        value = datetime.fromisoformat(value)
    if isinstance(value, datetime):
        return value.replace(tzinfo=value.tzinfo or timezone.utc).astimezone(timezone.utc)
    if isinstance(value, date):
        return datetime.combine(value, time(), tzinfo=timezone.utc)
    raise ValueError(f"start must be a date or datetime, got {value!r}")


def _money(value: Any, where: str) -> Decimal:
    if isinstance(value, float):
        raise ValueError(f"{where}: write money as a string such as \"0.25\", not a float")
    amount = Decimal(str(value))
    if not amount.is_finite() or amount < 0:
        raise ValueError(f"{where}: {value!r} is not a non-negative amount")
    return amount


def _latest(entries: list[tuple[datetime, Any]], ts: datetime) -> Any | None:
    """The entry with the latest start not after ts (entries sorted by start)."""
    found = None
    for start, value in entries:
        if start > ts:
            break
        found = value
    return found


def _tier_price(price: Price | None, total_input: int) -> Decimal | None:
    """genai-prices' cliff tiers: crossing a tier prices ALL tokens at that tier's rate."""
    if price is None or isinstance(price, Decimal):
        return price
    for tier in reversed(price.tiers):
        if total_input > tier.start:
            return tier.price
    return price.base


def _cost(tokens: int, per_mtok: Decimal | None) -> Decimal:
    if not tokens or per_mtok is None:
        return ZERO
    return q12(tokens * per_mtok / MTOK)


def token_components(rates: Rates, input_tokens: int, output_tokens: int, cache_read: int, cache_write: int,
                     event: Any = None) -> Components:
    """Exact cost components for one call; input_tokens includes the cache tokens. `event`, when given,
    supplies the rest of the sheet (1-hour writes, audio, image, reasoning, web searches). The tier is chosen
    by the call's total input tokens (genai-prices' long-context cliff) for every token rate."""
    def rate(price: Price | None, parent: Decimal | None) -> Decimal | None:
        found = _tier_price(price, input_tokens)
        return parent if found is None else found

    input_rate = _tier_price(rates.input, input_tokens)
    output_rate = _tier_price(rates.output, input_tokens)
    write_rate = rate(rates.cache_write, input_rate)
    if event is None:
        return Components(
            input=_cost(input_tokens - cache_read - cache_write, input_rate) + q12(rates.per_request),
            output=_cost(output_tokens, output_rate),
            cache_read=_cost(cache_read, rate(rates.cache_read, input_rate)),
            cache_write=_cost(cache_write, write_rate))
    write_1h, audio_in, image_in = event.cache_write_1h_tokens, event.input_audio_tokens, event.input_image_tokens
    audio_out, image_out, reasoning = event.output_audio_tokens, event.output_image_tokens, event.reasoning_tokens
    reasoning_rate = _tier_price(rates.reasoning, input_tokens)
    text_out = output_tokens - audio_out - image_out
    if reasoning_rate is not None:  # reasoning priced apart (a few models): still part of the output component
        output = _cost(text_out - reasoning, output_rate) + _cost(reasoning, reasoning_rate)
    else:
        output = _cost(text_out, output_rate)
    web = event.web_searches * rates.web_search if rates.web_search is not None else ZERO
    return Components(
        input=_cost(input_tokens - cache_read - cache_write - audio_in - image_in, input_rate) + q12(rates.per_request),
        output=output,
        cache_read=_cost(cache_read, rate(rates.cache_read, input_rate)),
        cache_write=_cost(cache_write - write_1h, write_rate),
        cache_write_1h=_cost(write_1h, rate(rates.cache_write_1h, write_rate)),
        input_audio=_cost(audio_in, rate(rates.input_audio, input_rate)),
        input_image=_cost(image_in, rate(rates.input_image, input_rate)),
        output_audio=_cost(audio_out, rate(rates.output_audio, output_rate)),
        output_image=_cost(image_out, rate(rates.output_image, output_rate)),
        web_search=q12(web),
    )


def _pico_tiers(rates: Rates) -> tuple[tuple[int, tuple[int, int, int, int, int]], ...] | None:
    """Integer rates per cliff tier: ((start, pico rates), ...) ascending; the rates of the last
    start below the call's input tokens apply (start -1: the base). None when a rate is not a
    whole number of pico-USD per token in some tier: those events take the Decimal path."""
    starts = sorted({t.start for r in rates[:4] if isinstance(r, gp.TieredPrices) for t in r.tiers})
    tiers = []
    for start in [-1, *starts]:  # each tier's rates are constant above its start (cliff: input > start)
        flat = Rates(*(_tier_price(r, start + 1) for r in rates[:4]), rates.per_request)
        ints = _pico_per_token(flat)
        if ints is None:
            return None
        tiers.append((start, ints))
    return tuple(tiers)


def _pico_per_token(rates: Rates) -> tuple[int, int, int, int, int] | None:
    """Whole pico-USD per token for (input, output, cache read, cache write) + pico per request.

    None when a rate is tiered or not a whole number of pico-USD per token (more than 6
    decimals per MTok): those events take the Decimal path.
    """
    if any(isinstance(r, gp.TieredPrices) for r in rates[:4]):
        return None
    rin = rates.input if rates.input is not None else ZERO
    fallbacks = (rin, rates.output if rates.output is not None else ZERO,
                 rates.cache_read if rates.cache_read is not None else rin,
                 rates.cache_write if rates.cache_write is not None else rin)
    per_token = [r.scaleb(6) for r in fallbacks] + [q12(rates.per_request).scaleb(12)]
    if any(p != p.to_integral_value() for p in per_token):
        return None
    return tuple(int(p) for p in per_token)  # type: ignore[return-value]


def _period_key(model: gp.ModelInfo, ts: datetime) -> Any:
    """Which price period ts falls in: prices only change at start dates or times of day."""
    if isinstance(model.prices, gp.ModelPrice):
        return None
    if any(isinstance(c.constraint, gp.TimeOfDateConstraint) for c in model.prices):
        return ts.replace(second=0, microsecond=0)
    return ts.date()


def _pico_parts(parts: Components) -> tuple[int, ...]:
    """price_pico's shape: the first four components, the total, then the rest."""
    values = tuple(int(p.scaleb(12)) for p in parts)
    return (*values[:4], sum(values), *values[4:])


def _has_variant(info: gp.ModelInfo, entry: tuple[str, str], ts: datetime) -> bool:
    """Whether genai-prices has a price variant for this context entry, active at ts."""
    key, value = entry
    return any(v.when.get(key) == value and (v.constraint is None or v.constraint.active(ts))
               for v in info.price_variants or ())


@dataclass(frozen=True)
class ComputeRate:
    vcpu_hour: Decimal  # USD per vCPU-hour of CPU time
    gib_hour: Decimal  # USD per GiB-hour of resident memory


@dataclass(frozen=True)
class CustomModel:
    start: datetime
    rates: Rates


class Catalog:
    """Prices from genai-prices and the project catalog file; see the module doc."""

    def __init__(self, data: dict[str, Any], file_bytes: bytes, source: str = "") -> None:
        self.source = source
        self.version = f"genai-prices {genai_prices.__version__} + catalog {hashlib.sha256(file_bytes).hexdigest()[:12]}"
        self.provider_aliases = {k.lower(): v for k, v in data.get("provider_aliases", {}).items()}
        self.gpus = sorted(
            ((name.lower(), _money(rate, f"gpus.{name}")) for name, rate in data.get("gpus", {}).items()),
            key=lambda item: -len(item[0]),
        )
        self.compute = {name.lower(): ComputeRate(_money(row["vcpu_hour_usd"], f"compute.{name}.vcpu_hour_usd"),
                                                  _money(row["gib_hour_usd"], f"compute.{name}.gib_hour_usd"))
                        for name, row in data.get("compute", {}).items()}
        self.tools = self._load_tools(data.get("tools", []))
        self.models = self._load_models(data.get("models", []))
        self.modifiers = self._load_modifiers(data.get("modifiers", []))
        self.tiers: list[list[str]] = [[m.lower() for m in models] for models in data.get("tiers", {}).values()]
        self.unpriced: Counter[tuple[str, str]] = Counter()
        self._snapshot = data_snapshot.get_snapshot()
        self._model_cache: dict[tuple[str, str], gp.ModelInfo | None] = {}
        self._rates_cache: dict[tuple[Any, ...], Rates | None] = {}
        self._day_cache: dict[tuple[str, str, int], tuple[Any, Rates] | None] = {}

    # ----------------------------------------------------------------- loading
    @staticmethod
    def _load_tools(rows: list[dict[str, Any]]) -> dict[tuple[str, str], list[tuple[datetime, Decimal]]]:
        tools: dict[tuple[str, str], list[tuple[datetime, Decimal]]] = {}
        for i, row in enumerate(rows):
            key = (row["tool"].lower(), row.get("provider", "").lower())
            tools.setdefault(key, []).append((_start_of(row.get("start")), _money(row["unit_usd"], f"tools[{i}].unit_usd")))
        return {k: sorted(v, key=lambda e: e[0]) for k, v in tools.items()}

    @staticmethod
    def _load_models(rows: list[dict[str, Any]]) -> dict[tuple[str, str], list[tuple[datetime, Rates]]]:
        models: dict[tuple[str, str], list[tuple[datetime, Rates]]] = {}
        for i, row in enumerate(rows):
            def rate(name: str) -> Decimal | None:
                return _money(row[name], f"models[{i}].{name}") if name in row else None

            rates = Rates(rate("input_mtok"), rate("output_mtok"), rate("cache_read_mtok"), rate("cache_write_mtok"),
                          rate("request_usd") or ZERO, web_search=rate("web_search_usd"),
                          **{name: rate(key) for name, key in SHEET_KEYS.items()})
            key = (row.get("provider", "*").lower(), row["model"].lower())
            models.setdefault(key, []).append((_start_of(row.get("start")), rates))
        return {k: sorted(v, key=lambda e: e[0]) for k, v in models.items()}

    @staticmethod
    def _load_modifiers(rows: list[dict[str, Any]]) -> dict[tuple[str, str, str], list[tuple[datetime, Decimal]]]:
        """(provider, context key, value) -> [(start, factor on token rates)]; see catalog.toml [[modifiers]]."""
        modifiers: dict[tuple[str, str, str], list[tuple[datetime, Decimal]]] = {}
        for i, row in enumerate(rows):
            keys = [k for k in ("processing", "service_tier") if k in row]
            if len(keys) != 1:
                raise ValueError(f"modifiers[{i}]: give exactly one of processing, service_tier")
            key = (row["provider"].lower(), keys[0], row[keys[0]])
            modifiers.setdefault(key, []).append((_start_of(row.get("start")), _money(row["factor"], f"modifiers[{i}].factor")))
        return {k: sorted(v, key=lambda e: e[0]) for k, v in modifiers.items()}

    def _modified(self, rates: Rates, provider: str, context: tuple[tuple[str, str], ...], ts: datetime) -> Rates:
        """Rates times the catalog's factor for each context entry (those genai-prices does not price)."""
        for key, value in context:
            entries = self.modifiers.get((provider, key, value))
            factor = _latest(entries, ts) if entries else None
            if factor is not None:
                rates = scale_tokens(rates, factor)
        return rates

    # ------------------------------------------------------------------ tokens
    def rates_for(self, provider: str, model: str, ts: datetime, context: tuple[tuple[str, str], ...] = ()) -> Rates | None:
        """The rates that applied to (provider, model) at ts in a price context (batch, service tier), or None
        when nobody prices it. genai-prices' price variants answer the context where it has one active at ts;
        the catalog's [[modifiers]] where it has none (and always for the catalog's own models)."""
        provider, model = provider.lower(), model.lower()
        custom = self.models.get((provider, model)) or self.models.get(("*", model))
        if custom:
            rates = _latest(custom, ts)
            return None if rates is None else self._modified(rates, provider, context, ts)
        info = self._model_info(provider, model)
        if info is None:
            return None
        # variants start on dates, so a context's rates are cached per day
        key = (provider, model, _period_key(info, ts)) if not context else (provider, model, ts.date(), context)
        try:
            return self._rates_cache[key]
        except KeyError:
            pass
        mp = info.get_prices(ts, dict(context) or None)
        rates = Rates(mp.input_mtok, mp.output_mtok, mp.cache_read_mtok, mp.cache_write_mtok,
                      (mp.requests_kcount or ZERO) / 1000,
                      web_search=None if mp.web_searches_kcount is None else mp.web_searches_kcount / 1000,
                      **{name: getattr(mp, price_key) for name, price_key in SHEET_KEYS.items()})
        unpriced = tuple(entry for entry in context if not _has_variant(info, entry, ts))
        rates = self._modified(rates, self.provider_aliases.get(provider, provider), unpriced, ts)
        if len(self._rates_cache) > 100_000:  # bounded: periods are days, so this only grows over years
            self._rates_cache.clear()
        self._rates_cache[key] = rates
        return rates

    def _model_info(self, provider: str, model: str) -> gp.ModelInfo | None:
        key = (provider, model)
        if key in self._model_cache:
            return self._model_cache[key]
        provider_id = self.provider_aliases.get(provider, provider) or None
        try:
            _, info = self._snapshot.find_provider_model(model, None, provider_id, None)
        except LookupError:
            info = None
        if len(self._model_cache) > 100_000:  # garbage model names must not grow memory without bound
            self._model_cache.clear()
        self._model_cache[key] = info
        return info

    def tool_unit_price(self, tool: str, provider: str, ts: datetime) -> Decimal | None:
        entries = self.tools.get((tool.lower(), provider.lower())) or self.tools.get((tool.lower(), ""))
        return _latest(entries, ts) if entries else None

    def list_price(self, event: UsageEvent) -> tuple[Components, Decimal] | None:
        """(components, total) from the catalogs, or None when nobody can price the event."""
        if event.kind == "llm_call":
            rates = self.rates_for(event.provider, event.model, event.ts, price_context(event))
            if rates is None:
                return None
            sheet = uses_sheet(event) or bool(event.reasoning_tokens and rates.reasoning is not None)
            if event.web_searches and rates.web_search is None:  # genai-prices has no per-search price: the catalog's
                rates = rates._replace(web_search=self.tool_unit_price("web_search", event.provider, event.ts))
            parts = token_components(rates, event.input_tokens, event.output_tokens,
                                     event.cache_read_tokens, event.cache_write_tokens, event if sheet else None)
            return parts, parts.total
        unit = self.tool_unit_price(event.tool, event.provider, event.ts)
        if unit is None:
            return None
        return NO_COMPONENTS, q12(unit * event.units)

    def price_pico(self, event: Any) -> tuple[int, ...] | None:
        """(input, output, cache_read, cache_write, total) list price in integer pico-USD, or None; an event
        that uses more of the sheet (uses_sheet) gets the other Components after total, in their order.

        The streams' hot path: same rules as list_price, with integer arithmetic whenever every
        rate is a whole number of pico-USD per token (true for nearly all public prices).
        """
        if event.kind == "llm_call":
            # uses_sheet(event) inline (a call measured +6 % instructions on this path; a tuple test of SHEET_FIELDS
            # +16 %): test_the_stream_path_prices_each_part_of_the_sheet_like_the_decimal_path keeps the two equal
            if (event.cache_write_1h_tokens or event.input_audio_tokens or event.input_image_tokens
                    or event.output_audio_tokens or event.output_image_tokens or event.web_searches
                    or event.batch or event.service_tier not in ("", "default")):  # rare: the Decimal path, same rounding
                listed = self.list_price(event)
                if listed is None:
                    return None
                return _pico_parts(listed[0])
            ts = event.ts
            per_token = self._day_cache.get((event.provider, event.model, ts.toordinal()), _MISS)
            if per_token is _MISS:
                per_token = self._day_rates(event.provider, event.model, ts)
            if per_token is None:
                return None
            ints, rates = per_token
            if event.reasoning_tokens and rates.reasoning is not None:  # reasoning priced apart: the Decimal path
                return _pico_parts(self.list_price(event)[0])  # type: ignore[index]
            if type(ints) is list:  # cliff tiers: the rates of the highest start below the input tokens
                chosen = ints[0][1]
                for start, tier in ints:
                    if event.input_tokens > start:
                        chosen = tier
                ints = chosen
            if ints is None:  # sub-pico rates: the Decimal path, same rounding
                parts = token_components(rates, event.input_tokens, event.output_tokens,
                                         event.cache_read_tokens, event.cache_write_tokens)
                values = tuple(int(p.scaleb(12)) for p in parts)
                return (*values, sum(values))  # type: ignore[return-value]
            rin, rout, rread, rwrite, request = ints
            read, write = event.cache_read_tokens, event.cache_write_tokens
            values = ((event.input_tokens - read - write) * rin + request, event.output_tokens * rout, read * rread, write * rwrite)
            return (*values, sum(values))  # type: ignore[return-value]
        unit = self.tool_unit_price(event.tool, event.provider, event.ts)
        if unit is None:
            return None
        total = int(q12(unit * event.units).scaleb(12))
        return 0, 0, 0, 0, total

    def _day_rates(self, provider: str, model: str, ts: datetime) -> tuple[Any, Rates] | None:
        """(integer rates or None, rates) for one UTC day, cached in _day_cache (which price_pico reads: one dict
        lookup per event) unless the prices change within the day."""
        rates = self.rates_for(provider, model, ts)
        if rates is None:
            value = None
        elif any(isinstance(r, gp.TieredPrices) for r in rates[:4]):
            tiers = _pico_tiers(rates)
            value = (None if tiers is None else list(tiers), rates)  # a list marks tiers (a tuple: flat rates)
        else:
            value = (_pico_per_token(rates), rates)
        if self._changes_within_a_day(provider.lower(), model.lower()):
            return value  # time-of-day prices or intraday catalog starts: no per-day cache
        if len(self._day_cache) > 200_000:
            self._day_cache.clear()
        self._day_cache[(provider, model, ts.toordinal())] = value
        return value

    def _changes_within_a_day(self, provider: str, model: str) -> bool:
        custom = self.models.get((provider, model)) or self.models.get(("*", model))
        if custom:
            return any(start.time() != time() for start, _ in custom)
        info = self._model_info(provider, model)
        return info is not None and not isinstance(info.prices, gp.ModelPrice) and any(
            isinstance(c.constraint, gp.TimeOfDateConstraint) for c in info.prices)

    def price_usage(self, event: UsageEvent) -> PricedEvent:
        """The event with its exact price (see the module doc for the rules)."""
        listed = self.list_price(event)
        parts, list_cost = listed if listed is not None else (NO_COMPONENTS, ZERO)
        if event.cost_usd is not None:
            cost, source = q12(event.cost_usd), "provider"
        elif listed is not None:
            cost, source = list_cost, "catalog"
        else:
            cost, source = ZERO, "unpriced"
            self.unpriced[(event.provider, event.model or event.tool)] += 1
        fields = dict(event)
        fields["cost_usd"] = cost
        return PricedEvent.model_construct(
            **fields,
            list_cost_usd=list_cost,
            input_cost_usd=parts.input,
            output_cost_usd=parts.output,
            cache_read_cost_usd=parts.cache_read,
            cache_write_cost_usd=parts.cache_write,
            cache_write_1h_cost_usd=parts.cache_write_1h,
            input_audio_cost_usd=parts.input_audio,
            input_image_cost_usd=parts.input_image,
            output_audio_cost_usd=parts.output_audio,
            output_image_cost_usd=parts.output_image,
            web_search_cost_usd=parts.web_search,
            cost_source=source,
            catalog_version=self.version,
            priced_at=utcnow(),
        )

    # --------------------------------------------------------------------- GPU
    def gpu_hourly(self, gpu_name: str) -> Decimal | None:
        name = gpu_name.lower()
        return next((rate for key, rate in self.gpus if key in name), None)

    def price_gpu(self, gpu_name: str, seconds: Decimal, mig_slices: int = 0, mig_total_slices: int = 0) -> Decimal:
        """Exact USD for `seconds` of a whole GPU, or of a MIG slice (slices / total of the GPU's rate)."""
        hourly = self.gpu_hourly(gpu_name)
        if hourly is None:
            raise LookupError(f"no $/hour for GPU {gpu_name!r}; add it under [gpus] in {self.source or 'the catalog'}")
        numerator, denominator = Decimal(seconds) * hourly, SECONDS_PER_HOUR
        if mig_slices and mig_total_slices:
            numerator, denominator = numerator * mig_slices, denominator * mig_total_slices
        with localcontext(prec=50):
            return q12(numerator / denominator)

    def gpu_sample_cost(self, sample: GpuSample) -> tuple[Decimal, Decimal]:
        """(GPU-seconds, USD) of one sample's interval; MIG rows count their fraction of the GPU, and a
        process row its 1/device_processes share, rounded down (the stream and the ledger charge the same;
        the remainder, under a pico-dollar per process, is never charged)."""
        seconds = Decimal(sample.interval_ms) / 1000
        slices, total = (sample.mig_slices, sample.mig_total_slices) if sample.mig_slices and sample.mig_total_slices else (0, 0)
        with localcontext(prec=50):
            gpu_seconds = q12(seconds * slices / total) if total else q12(seconds)
        cost = self.price_gpu(sample.gpu_name, seconds, slices, total)
        n = sample.device_processes if sample.level == "process" else 1
        if n > 1:
            gpu_seconds, cost = ((x / n).quantize(QUANTUM, rounding=ROUND_DOWN) for x in (gpu_seconds, cost))
        return gpu_seconds, cost

    # ----------------------------------------------------------------- CPU and memory
    def compute_rate(self, node_class: str) -> ComputeRate:
        rate = self.compute.get(node_class.lower())
        if rate is None:
            raise LookupError(f"no $/vCPU-hour for node class {node_class!r}; add [compute.{node_class}] to "
                              f"{self.source or 'the catalog'}")
        return rate

    def compute_sample_cost(self, sample: ComputeSample) -> tuple[Decimal, Decimal]:
        """(CPU USD, memory USD) of one sample: CPU-seconds x $/vCPU-hour / 3600 and byte-seconds x
        $/GiB-hour / (3600 x 2^30), each rounded to 12 places once (LookupError: class not in the catalog)."""
        rate = self.compute_rate(sample.node_class)
        with localcontext(prec=60):
            return (q12(sample.cpu_seconds * rate.vcpu_hour / SECONDS_PER_HOUR),
                    q12(sample.memory_byte_seconds * rate.gib_hour / (SECONDS_PER_HOUR * GIB)))

    # ----------------------------------------------------------------- tiers
    def downgrade_for(self, model: str) -> str | None:
        """The next cheaper model in the same task tier, or None (already cheapest / unknown)."""
        model = model.lower()
        for tier in self.tiers:
            if model in tier:
                i = tier.index(model)
                return tier[i + 1] if i + 1 < len(tier) else None
        return None


def parse_catalog(text: str, source: str = "") -> Catalog:
    return Catalog(tomllib.loads(text), text.encode(), source)


@lru_cache(maxsize=8)
def _load(path: Path, mtime_ns: int) -> Catalog:
    raw = path.read_bytes()
    return Catalog(tomllib.loads(raw.decode()), raw, str(path))


def load_catalog(path: str | Path | None = None) -> Catalog:
    """The catalog from `path` (default: the `catalog` setting, METERLINE_CATALOG, else streams/catalog.toml), so
    every component prices with one catalog; cached until the file changes. A file that is not one: CatalogError."""
    path = Path(path or get_settings().catalog or DEFAULT_CATALOG).resolve()
    try:
        return _load(path, path.stat().st_mtime_ns)
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as err:
        raise CatalogError(f"cannot read the price catalog {path}: {first_line(err)}; fix the file, or name another with METERLINE_CATALOG") from None
