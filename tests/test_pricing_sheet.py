"""The whole price sheet (issue 13 item 4): every new usage field changes the price by the provider's
published rate. Each expected price is computed by hand from the sheet named next to it."""
from __future__ import annotations

from datetime import datetime, timezone
from decimal import Decimal

import pytest

from meterline.schemas.events import InvalidEvent, UsageEvent, build, new_id
from meterline.streams.pricing import Components, load_catalog
from meterline.streams.worker import SHEET_COST_FIELDS

NOW = datetime(2026, 11, 20, 12, 0, tzinfo=timezone.utc)  # genai-prices 0.2.3's batch/tier variants are active
BEFORE_VARIANTS = datetime(2026, 3, 1, tzinfo=timezone.utc)  # before them: the catalog's [[modifiers]] apply
M = 1_000_000


def usage(ts=NOW, **fields) -> UsageEvent:
    return build(UsageEvent, event_id=new_id(), ts=ts, tenant_id="acme", kind="llm_call", **fields)


@pytest.fixture(scope="module")
def catalog():
    return load_catalog()


def cost(catalog, **fields) -> Decimal:
    priced = catalog.price_usage(usage(**fields))
    assert priced.cost_source == "catalog"
    return priced.cost_usd


def test_anthropic_one_hour_cache_write_is_twice_base_input(catalog):
    # anthropic.com/pricing, Claude Sonnet 4.5: input $3/MTok, 5-min cache write 1.25x = $3.75, 1-hour 2x = $6
    # (100k input tokens: below the 200k long-context tier)
    fields = dict(provider="anthropic", model="claude-sonnet-4-5", input_tokens=100_000, output_tokens=0, cache_write_tokens=100_000)
    assert cost(catalog, **fields) == Decimal("0.375")
    assert cost(catalog, **fields, cache_write_1h_tokens=100_000) == Decimal("0.6")
    priced = catalog.price_usage(usage(**fields, cache_write_1h_tokens=40_000))  # 60k at 5 min, 40k at 1 h
    assert (priced.cache_write_cost_usd, priced.cache_write_1h_cost_usd) == (Decimal("0.225"), Decimal("0.24"))


def test_long_context_tier_applies_to_every_component(catalog):
    # ai.google.dev/gemini-api/docs/pricing, Gemini 2.5 Pro: input $1.25 / output $10 up to 200k prompt tokens,
    # $2.50 / $15 above (the whole call)
    assert cost(catalog, provider="google", model="gemini-2.5-pro", input_tokens=200_000, output_tokens=10_000) == \
        Decimal("0.25") + Decimal("0.1")
    assert cost(catalog, provider="google", model="gemini-2.5-pro", input_tokens=200_001, output_tokens=10_000) == \
        Decimal("0.5000025") + Decimal("0.15")
    # anthropic.com/pricing, Sonnet 4.5 above 200k input: 1-hour cache write $12/MTok (2x the $6 input)
    priced = catalog.price_usage(usage(provider="anthropic", model="claude-sonnet-4-5", input_tokens=300_000, output_tokens=0,
                                       cache_write_tokens=100_000, cache_write_1h_tokens=100_000))
    assert (priced.input_cost_usd, priced.cache_write_1h_cost_usd) == (Decimal("1.2"), Decimal("1.2"))


@pytest.mark.parametrize("ts", [NOW, BEFORE_VARIANTS], ids=["genai-prices variant", "catalog modifier"])
def test_openai_batch_and_flex_are_half_price(catalog, ts):
    # openai.com/api/pricing, GPT-5: input $1.25, output $10; Batch API and Flex: 50% (platform.openai.com/docs/guides/batch,
    # /docs/guides/flex-processing)
    call = dict(ts=ts, provider="openai", model="gpt-5", input_tokens=M, output_tokens=M)
    assert cost(catalog, **call) == Decimal("11.25")
    assert cost(catalog, **call, batch=True) == Decimal("5.625")
    assert cost(catalog, **call, service_tier="flex") == Decimal("5.625")
    assert cost(catalog, **call, service_tier="default") == Decimal("11.25")


def test_openai_priority_tier(catalog):
    # openai.com/api/pricing, GPT-5 Priority processing: input $2.50, output $20 (genai-prices' variant)
    assert cost(catalog, provider="openai", model="gpt-5", input_tokens=M, output_tokens=M, service_tier="priority") == Decimal("22.5")


def test_anthropic_batch_is_half_price_from_the_catalog(catalog):
    # docs.claude.com/en/docs/build-with-claude/batch-processing: 50% off; Opus 4.1 $15 / $75 -> $7.50 / $37.50.
    # genai-prices 0.2.3 has no batch price for Opus 4.1: the catalog's modifier gives it.
    call = dict(provider="anthropic", model="claude-opus-4-1", input_tokens=M, output_tokens=M)
    assert cost(catalog, **call) == Decimal("90")
    assert cost(catalog, **call, batch=True) == Decimal("45")


def test_gemini_batch_keeps_the_long_context_tier(catalog):
    # ai.google.dev/gemini-api/docs/batch-mode: 50% of the interactive price; Gemini 2.5 Pro >200k: $2.50 / $15
    assert cost(catalog, provider="google", model="gemini-2.5-pro", input_tokens=M, output_tokens=M, batch=True) == \
        Decimal("1.25") + Decimal("7.5")


def test_audio_tokens_at_their_own_rates(catalog):
    # openai.com/api/pricing, gpt-realtime: text input $4 / output $16, audio input $32 / output $64 per MTok
    priced = catalog.price_usage(usage(provider="openai", model="gpt-realtime", input_tokens=M, output_tokens=M,
                                       input_audio_tokens=250_000, output_audio_tokens=500_000))
    assert (priced.input_cost_usd, priced.input_audio_cost_usd) == (Decimal("3"), Decimal("8"))
    assert (priced.output_cost_usd, priced.output_audio_cost_usd) == (Decimal("8"), Decimal("32"))
    assert priced.cost_usd == Decimal("51")


def test_image_tokens_at_their_own_rate(catalog):
    # openai.com/api/pricing, gpt-image-1: text input $5, image input $10, output (image) $40 per MTok
    priced = catalog.price_usage(usage(provider="openai", model="gpt-image-1", input_tokens=2000, output_tokens=4160,
                                       input_image_tokens=1000, output_image_tokens=4160))
    assert (priced.input_cost_usd, priced.input_image_cost_usd) == (Decimal("0.005"), Decimal("0.01"))
    assert priced.output_image_cost_usd == Decimal("0.1664")


def test_web_searches(catalog):
    # docs.claude.com web search tool: $10 per 1,000 searches; a model genai-prices gives no search price
    # takes the catalog's web_search tool price (streams/catalog.toml: $0.008 from 2025-07-01)
    assert cost(catalog, provider="anthropic", model="claude-sonnet-4-5", input_tokens=0, output_tokens=0, web_searches=3) == Decimal("0.03")
    assert cost(catalog, provider="self-hosted", model="llama-3.1-8b-instruct", input_tokens=0, output_tokens=0,
                web_searches=3) == Decimal("0.024")


def test_components_add_up_to_the_cost_and_the_stream_path_agrees(catalog):
    event = usage(provider="openai", model="gpt-realtime", input_tokens=123_457, output_tokens=98_765, cache_read_tokens=1_001,
                  input_audio_tokens=50_003, input_image_tokens=7, output_audio_tokens=40_009, reasoning_tokens=11,
                  web_searches=2, service_tier="flex")
    priced = catalog.price_usage(event)
    parts = [getattr(priced, f"{name}_cost_usd") for name in Components._fields]
    assert sum(parts) == priced.cost_usd == priced.list_cost_usd and priced.cost_usd > 0
    pico = catalog.price_pico(event)  # the stream's hot path: the same components, total at index 4
    assert pico[4] == int(priced.cost_usd.scaleb(12))
    assert [*pico[:4], *pico[5:]] == [int(p.scaleb(12)) for p in parts]
    assert len(SHEET_COST_FIELDS) == len(pico) - 5


def test_contract_subset_rules():
    base = dict(provider="openai", model="gpt-realtime", input_tokens=100, output_tokens=100)
    for bad in (dict(cache_write_tokens=10, cache_write_1h_tokens=11), dict(cache_read_tokens=60, input_audio_tokens=41),
                dict(input_audio_tokens=60, input_image_tokens=41), dict(reasoning_tokens=60, output_audio_tokens=41),
                dict(output_image_tokens=101), dict(service_tier="scale")):
        with pytest.raises(InvalidEvent):
            usage(**base, **bad)
    with pytest.raises(InvalidEvent):
        build(UsageEvent, **{**usage(**base).model_dump(), "batch": 1})  # StrictBool
    old = usage(**base).model_dump(exclude={"cache_write_1h_tokens", "web_searches", "service_tier", "batch"})
    assert build(UsageEvent, **old).batch is False  # old records decode


def test_focus_gives_each_part_of_the_sheet_its_own_row_at_its_list_rate(catalog):
    """A FOCUS line (as focus_usage.sql sums it) of one call with 5-minute and 1-hour writes and web searches."""
    from meterline.app.focus import usage_rows

    p = catalog.price_usage(usage(provider="anthropic", model="claude-sonnet-4-5", input_tokens=100_000, output_tokens=1_000,
                                  cache_write_tokens=30_000, cache_write_1h_tokens=10_000, web_searches=3))
    line = {"hour": NOW.replace(minute=0), "tenant_id": "acme", "team": "", "project": "", "agent_id": "", "session_id": "s",
            "kind": "llm_call", "provider": "anthropic", "model": "claude-sonnet-4-5", "tool": "", "priority": "normal",
            "service_tier": "", "batch": False, "cost_source": p.cost_source, "catalog_version": p.catalog_version, "events": 1,
            "uncached_input_qty": 70_000, "cache_read_qty": 0, "cache_write_qty": 20_000, "cache_write_1h_qty": 10_000,
            "input_audio_qty": 0, "input_image_qty": 0, "output_qty": 1_000, "output_audio_qty": 0, "output_image_qty": 0,
            "web_search_qty": 3, "units_qty": 0, "billed_cost_usd": p.cost_usd, "list_cost_usd": p.list_cost_usd,
            **{f"{c}_list_usd": getattr(p, f"{c}_cost_usd") for c in ("input", "cache_read", "cache_write", "cache_write_1h",
               "input_audio", "input_image", "output", "output_audio", "output_image", "web_search")}}
    rows = {r["SkuMeter"]: r for r in usage_rows([line], "meterline", catalog)}
    assert set(rows) == {"Input Tokens", "Cached Input Tokens (write, 5m)", "Cached Input Tokens (write, 1h)",
                         "Output Tokens", "Web Searches"}
    # anthropic.com/pricing, Sonnet 4.5: 5-min write $3.75/MTok, 1-hour write $6/MTok, web search $10 per 1,000
    assert rows["Cached Input Tokens (write, 5m)"]["ListUnitPrice"] == Decimal("0.00000375")
    assert rows["Cached Input Tokens (write, 1h)"]["ListUnitPrice"] == Decimal("0.000006")
    assert rows["Web Searches"]["ListUnitPrice"] == Decimal("0.01") and rows["Web Searches"]["PricingUnit"] == "Searches"
    assert sum((r["EffectiveCost"] for r in rows.values()), Decimal(0)) == p.cost_usd
