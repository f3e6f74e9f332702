"""Pricing: exact Decimal money, cache tokens at their own rates, historic prices, overrides, GPU."""
from __future__ import annotations

from datetime import datetime, timezone
from decimal import Decimal

import genai_prices
import pytest
from genai_prices import data_snapshot

from meterline.schemas.events import GpuSample, UsageEvent, build, new_id
from meterline.streams.pricing import DEFAULT_CATALOG, load_catalog, parse_catalog

TS = datetime(2025, 9, 1, 12, 0, tzinfo=timezone.utc)


def usage(**fields) -> UsageEvent:
    base = dict(event_id=new_id(), ts=TS, tenant_id="acme", kind="llm_call", provider="anthropic", model="claude-sonnet-4-5")
    return build(UsageEvent, **{**base, **fields})


@pytest.fixture(scope="module")
def catalog():
    return load_catalog()


def test_cached_tokens_priced_at_their_own_rates_and_not_double_counted(catalog):
    # sonnet 4.5: $3 input, $0.30 cache read, $3.75 cache write, $15 output per MTok.
    priced = catalog.price_usage(usage(input_tokens=1000, cache_read_tokens=400, cache_write_tokens=100, output_tokens=10))
    assert priced.input_cost_usd == Decimal("0.001500000000")  # 500 uncached tokens, not 1000
    assert priced.cache_read_cost_usd == Decimal("0.000120000000")
    assert priced.cache_write_cost_usd == Decimal("0.000375000000")
    assert priced.output_cost_usd == Decimal("0.000150000000")
    assert priced.cost_usd == priced.list_cost_usd == Decimal("0.002145000000")
    assert priced.cost_source == "catalog" and priced.catalog_version == catalog.version


@pytest.mark.parametrize("model", ["gpt-4o", "claude-sonnet-4-5", "claude-opus-4-6", "gemini-2.5-flash", "grok-4.20", "deepseek-v4-flash"])
@pytest.mark.parametrize("tokens", [(1000, 10, 400, 100), (250_000, 5000, 100_000, 0), (7, 3, 0, 7)])
def test_matches_genai_prices_exactly(catalog, model, tokens):
    """The cached fast path agrees with genai_prices.calc_price (tiers, cache fallbacks included)."""
    inp, out, read, write = tokens
    event = usage(provider="", model=model, input_tokens=inp, output_tokens=out, cache_read_tokens=read, cache_write_tokens=write)
    expected = genai_prices.calc_price(
        genai_prices.Usage(input_tokens=inp, output_tokens=out, cache_read_tokens=read, cache_write_tokens=write),
        model, genai_request_timestamp=TS,
    ).total_price
    assert catalog.price_usage(event).cost_usd == expected.quantize(Decimal("1e-12"))


def test_genai_prices_historic_price_change_by_event_timestamp(catalog):
    # mistral ministral-8b-latest: $0.10 input until 2025-12-02, $0.15 from then on.
    before = usage(provider="mistral", model="ministral-8b-latest", input_tokens=1_000_000, ts=datetime(2025, 12, 1, 23, 59, tzinfo=timezone.utc))
    after = usage(provider="mistral", model="ministral-8b-latest", input_tokens=1_000_000, ts=datetime(2025, 12, 2, 0, 0, tzinfo=timezone.utc))
    assert catalog.price_usage(before).cost_usd == Decimal("0.1")
    assert catalog.price_usage(after).cost_usd == Decimal("0.15")


def test_catalog_entry_with_start_date(catalog):
    kw = dict(provider="self-hosted", model="qwen2.5-coder-32b", input_tokens=2_000_000, output_tokens=1_000_000)
    assert catalog.price_usage(usage(**kw, ts=datetime(2025, 5, 31, tzinfo=timezone.utc))).cost_usd == Decimal("0.5")  # 2*.10 + .30
    assert catalog.price_usage(usage(**kw, ts=datetime(2025, 6, 1, tzinfo=timezone.utc))).cost_usd == Decimal("0.4")  # 2*.08 + .24


def test_provider_reported_cost_overrides_catalog_and_keeps_list_cost(catalog):
    priced = catalog.price_usage(usage(input_tokens=1000, output_tokens=10, cost_usd=Decimal("0.0009")))
    assert priced.cost_source == "provider"
    assert priced.cost_usd == Decimal("0.0009")
    assert priced.list_cost_usd == Decimal("0.003150000000")


def test_unknown_model_is_kept_unpriced_and_counted():
    catalog = parse_catalog(DEFAULT_CATALOG.read_text())
    priced = catalog.price_usage(usage(provider="nobody", model="mystery-model-9000", input_tokens=10))
    assert (priced.cost_source, priced.cost_usd) == ("unpriced", Decimal(0))
    assert catalog.unpriced[("nobody", "mystery-model-9000")] == 1
    assert catalog.price_usage(usage(kind="tool_call", tool="unknown-tool", model="")).cost_source == "unpriced"


def test_tool_call_per_unit_with_price_change(catalog):
    old = usage(kind="tool_call", model="", provider="", tool="web_search", units=3, ts=datetime(2025, 6, 30, tzinfo=timezone.utc))
    new = usage(kind="tool_call", model="", provider="", tool="web_search", units=3, ts=datetime(2025, 7, 1, tzinfo=timezone.utc))
    assert catalog.price_usage(old).cost_usd == Decimal("0.03")
    assert catalog.price_usage(new).cost_usd == Decimal("0.024")


def test_gpu_mig_slice_pays_its_fraction(catalog):
    whole = catalog.price_gpu("NVIDIA H100 80GB HBM3", Decimal(3600))
    assert whole == Decimal("2.49")
    assert catalog.price_gpu("NVIDIA H100 80GB HBM3", Decimal(3600), 1, 7) == Decimal("0.355714285714")  # 2.49/7, half-even
    assert catalog.price_gpu("NVIDIA A100-SXM4-80GB", Decimal(1800)) == Decimal("0.895")  # longest key wins over "a100"
    sample = build(GpuSample, sample_id=new_id(), ts=TS, node="n1", level="mig", gpu_index=0, gpu_uuid="GPU-1",
                   gpu_name="NVIDIA H100 80GB HBM3", mig_uuid="MIG-1", mig_slices=3, mig_total_slices=7, interval_ms=7000)
    assert catalog.gpu_sample_cost(sample) == (Decimal("3"), Decimal("0.002075000000"))  # 7 s * 3/7 = 3 GPU-s
    with pytest.raises(LookupError, match="gpus"):
        catalog.price_gpu("Voodoo 5500", Decimal(1))


def test_version_names_both_sources_and_changes_with_the_file():
    text = DEFAULT_CATALOG.read_text()
    a, b = parse_catalog(text), parse_catalog(text + "\n# edited\n")
    assert a.version.startswith(f"genai-prices {genai_prices.__version__} + catalog ")
    assert a.version != b.version


def test_money_must_not_be_float():
    with pytest.raises(ValueError, match="string"):
        parse_catalog('[gpus]\n"h100" = 2.49\n')


def test_downgrade_within_tier(catalog):
    assert catalog.downgrade_for("claude-sonnet-4-5") == "claude-sonnet-4"
    assert catalog.downgrade_for("gpt-4.1-nano") is None
    assert catalog.downgrade_for("unknown") is None


def test_rates_resolved_once_per_period(catalog):
    catalog.price_usage(usage(model="gpt-4o", provider="openai", input_tokens=5))
    lookups = len(data_snapshot.get_snapshot()._lookup_cache)
    for _ in range(100):
        catalog.price_usage(usage(model="gpt-4o", provider="openai", input_tokens=5))
    assert len(data_snapshot.get_snapshot()._lookup_cache) == lookups
    assert ("openai", "gpt-4o", None) in catalog._rates_cache


@pytest.mark.parametrize("model", ["gpt-4o", "claude-sonnet-4-5", "claude-opus-4-6", "grok-4.20", "deepseek-v4-flash"])
def test_integer_fast_path_equals_decimal_path(catalog, model):
    for inp, out, read, write in [(1000, 10, 400, 100), (250_000, 5000, 100_000, 0), (7, 3, 0, 7), (0, 0, 0, 0)]:
        event = usage(provider="", model=model, input_tokens=inp, output_tokens=out, cache_read_tokens=read, cache_write_tokens=write)
        priced = catalog.price_usage(event)
        pico = catalog.price_pico(event)
        expected = (priced.input_cost_usd, priced.output_cost_usd, priced.cache_read_cost_usd, priced.cache_write_cost_usd, priced.list_cost_usd)
        assert tuple(Decimal(p).scaleb(-12) for p in pico) == expected


def test_compute_samples_are_priced_per_vcpu_hour_and_gib_hour_of_their_node_class_exactly(catalog):
    from meterline.schemas.events import ComputeSample

    sample = build(ComputeSample, sample_id=new_id(), ts=datetime.now(timezone.utc), node="n1", node_class="N2",
                   level="process", pid=1, interval_ms=10_000, cpu_user_seconds=Decimal("7.25"),
                   cpu_system_seconds=Decimal("0.75"), memory_byte_seconds=Decimal(3 << 30) * 10)
    cpu, memory = catalog.compute_sample_cost(sample)
    assert cpu == (Decimal(8) * Decimal("0.031611") / Decimal(3600)).quantize(Decimal("1e-12"))  # 0.000070246667
    assert str(cpu) == "0.000070246667" and str(memory) == "0.000035308333"  # 30 GiB-s x 0.004237 / 3600
    hour = build(ComputeSample, **{**sample.model_dump(), "interval_ms": 3_600_000, "cpu_user_seconds": Decimal(3600),
                                   "cpu_system_seconds": Decimal(0), "memory_byte_seconds": Decimal(1 << 30) * 3600})
    assert catalog.compute_sample_cost(hour) == (Decimal("0.031611"), Decimal("0.004237"))  # one vCPU-hour, one GiB-hour
    with pytest.raises(LookupError, match=r"\[compute.tiny\]"):
        catalog.compute_sample_cost(build(ComputeSample, **{**sample.model_dump(), "node_class": "tiny"}))


SHEET_FIELDS = ("cache_write_1h_tokens", "input_audio_tokens", "input_image_tokens", "output_audio_tokens",
                "output_image_tokens", "web_searches", "batch", "service_tier")


@pytest.mark.parametrize("model", ["gpt-realtime", "gpt-4o", "claude-sonnet-4-5"])
@pytest.mark.parametrize("field", SHEET_FIELDS)
def test_the_stream_path_prices_each_part_of_the_sheet_like_the_decimal_path(catalog, model, field):
    """price_pico's inlined "uses more of the sheet" test: an event that sets any one of those fields is priced
    exactly as list_price (the Decimal path, independent of the integer fast path) prices it."""
    value = {"batch": True, "service_tier": "flex", "cache_write_1h_tokens": 50}.get(field, 321)
    event = usage(provider="", model=model, input_tokens=10_000, output_tokens=2_000, cache_write_tokens=100, **{field: value})
    listed = catalog.list_price(event)
    pico = catalog.price_pico(event)
    if listed is None:
        assert pico is None
        return
    parts, total = listed
    assert pico[4] == int(total.scaleb(12)) and [*pico[:4], *pico[5:]] == [int(p.scaleb(12)) for p in parts]
