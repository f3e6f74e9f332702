-- Priced usage events: one row per PricedEvent (schemas/events.py), the record of every cent.
-- Money is Decimal(38, 18): 20 integer digits, 18 fractional, a superset of the contract's
-- Decimal(28, 12), so any contract value (and any per-token price) is stored exactly.
-- Plain MergeTree, not ReplacingMergeTree: the sink drops duplicate event_ids before the insert
-- (see sql/README.md), which is the only thing that keeps them out of the rollup views.
-- @distributed cityHash64(tenant_id)
CREATE TABLE IF NOT EXISTS priced_events
(
    event_id UUID,
    ts DateTime64(3, 'UTC'),
    tenant_id LowCardinality(String),
    team LowCardinality(String),
    project LowCardinality(String),
    agent_id LowCardinality(String),
    session_id String,
    kind LowCardinality(String),
    provider LowCardinality(String),
    model LowCardinality(String),
    input_tokens UInt64,
    output_tokens UInt64,
    cache_read_tokens UInt64,
    cache_write_tokens UInt64,
    tool LowCardinality(String),
    units UInt64,
    latency_ms UInt64,
    status LowCardinality(String),
    response_bytes UInt64,
    priority LowCardinality(String),
    cost_usd Decimal(38, 18),
    list_cost_usd Decimal(38, 18),
    input_cost_usd Decimal(38, 18),
    output_cost_usd Decimal(38, 18),
    cache_read_cost_usd Decimal(38, 18),
    cache_write_cost_usd Decimal(38, 18),
    cost_source LowCardinality(String),
    catalog_version LowCardinality(String),
    priced_at DateTime64(3, 'UTC'),
    attributes Map(String, String),
    _topic LowCardinality(String),
    _partition UInt32,
    _offset UInt64,
    _batch_start UInt64,
    _ingested_at DateTime64(3, 'UTC') DEFAULT now64(3),
    INDEX idx_session session_id TYPE bloom_filter(0.01) GRANULARITY 4
)
ENGINE = MergeTree
PARTITION BY toYYYYMM(ts)
ORDER BY (tenant_id, team, project, agent_id, ts);

-- The sink's duplicate check: "which of these event_ids are already in the ledger?" is a
-- primary-key lookup here (the raw table is ordered for chargeback, not by id).
-- @distributed cityHash64(tenant_id)
CREATE TABLE IF NOT EXISTS priced_event_ids
(
    tenant_id LowCardinality(String),
    ts DateTime64(3, 'UTC'),
    event_id UUID
)
ENGINE = ReplacingMergeTree
PARTITION BY toYYYYMM(ts)
ORDER BY (toStartOfHour(ts), event_id);

CREATE MATERIALIZED VIEW IF NOT EXISTS priced_event_ids_mv TO priced_event_ids AS
SELECT tenant_id, ts, event_id FROM priced_events;
