-- Replicas recommended per inference endpoint (ScaleRecommendation; `meterline plan endpoints --publish` -> the
-- compacted scale topic -> the sink). Every version is kept; /metrics serves the latest per endpoint.
-- @distributed cityHash64(endpoint)
CREATE TABLE IF NOT EXISTS scale_recommendations
(
    recommendation_id UUID,
    ts DateTime64(3, 'UTC'),
    endpoint String,
    provider LowCardinality(String),
    model LowCardinality(String),
    window_start DateTime64(3, 'UTC'),
    window_end DateTime64(3, 'UTC'),
    requests UInt64,
    rate_rps Decimal(38, 18),
    service_ms UInt64,
    p95_latency_ms UInt64,
    slo_ms UInt64,
    target_utilization_pct UInt8,
    concurrency UInt32,
    gpu_utilization_pct Nullable(UInt8),
    observed_replicas Nullable(UInt64),
    min_replicas UInt64,
    max_replicas UInt64,
    recommended_replicas UInt64,
    predicted_p95_ms Nullable(UInt64),
    reason String,
    _topic LowCardinality(String),
    _partition UInt32,
    _offset UInt64,
    _batch_start UInt64,
    _ingested_at DateTime64(3, 'UTC') DEFAULT now64(3)
)
ENGINE = MergeTree
PARTITION BY toYYYYMM(ts)
ORDER BY (endpoint, ts);
