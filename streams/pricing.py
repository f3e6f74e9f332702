"""Pricing: the one source of truth for what a usage event or GPU time costs.

INTERFACE DRAFT (owned by the streams work; other components call only these names):

    catalog = load_catalog(path=None)          # project catalog + genai-prices, cached
    catalog.version -> str                      # stored on every priced row
    catalog.price_usage(event: UsageEvent) -> PricedEvent
    catalog.price_gpu(gpu_name: str, seconds: Decimal, mig_slices: int = 0, mig_total_slices: int = 0)
        -> Decimal                              # exact USD for that GPU time
    catalog.gpu_sample_cost(sample: GpuSample) -> tuple[Decimal, Decimal]   # (gpu_seconds, usd)
    catalog.downgrade_for(model: str) -> str | None   # a cheaper model of the same task tier

All money is Decimal; nothing here touches float.
"""
