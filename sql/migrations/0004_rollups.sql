-- Hourly rollups, filled by materialized views at insert time. SummingMergeTree sums every
-- numeric non-key column on merge (Decimal stays Decimal); always read them with sum() and
-- GROUP BY, since rows of one key may not be merged yet.

-- @distributed cityHash64(tenant_id)
CREATE TABLE IF NOT EXISTS usage_hourly
(
    hour DateTime64(3, 'UTC'),
    tenant_id LowCardinality(String),
    team LowCardinality(String),
    project LowCardinality(String),
    agent_id LowCardinality(String),
    provider LowCardinality(String),
    model LowCardinality(String),
    kind LowCardinality(String),
    events UInt64,
    error_events UInt64,
    unpriced_events UInt64,
    input_tokens UInt64,
    output_tokens UInt64,
    cache_read_tokens UInt64,
    cache_write_tokens UInt64,
    units UInt64,
    cost_usd Decimal(38, 18),
    list_cost_usd Decimal(38, 18),
    input_cost_usd Decimal(38, 18),
    output_cost_usd Decimal(38, 18),
    cache_read_cost_usd Decimal(38, 18),
    cache_write_cost_usd Decimal(38, 18)
)
ENGINE = SummingMergeTree
PARTITION BY toYYYYMM(hour)
ORDER BY (tenant_id, team, project, agent_id, provider, model, kind, hour);

CREATE MATERIALIZED VIEW IF NOT EXISTS usage_hourly_mv TO usage_hourly AS
SELECT
    toDateTime64(toStartOfHour(ts), 3, 'UTC') AS hour,
    tenant_id, team, project, agent_id, provider, model, kind,
    count() AS events,
    countIf(status != 'ok') AS error_events,
    countIf(cost_source = 'unpriced') AS unpriced_events,
    sum(input_tokens) AS input_tokens,
    sum(output_tokens) AS output_tokens,
    sum(cache_read_tokens) AS cache_read_tokens,
    sum(cache_write_tokens) AS cache_write_tokens,
    sum(units) AS units,
    sum(cost_usd) AS cost_usd,
    sum(list_cost_usd) AS list_cost_usd,
    sum(input_cost_usd) AS input_cost_usd,
    sum(output_cost_usd) AS output_cost_usd,
    sum(cache_read_cost_usd) AS cache_read_cost_usd,
    sum(cache_write_cost_usd) AS cache_write_cost_usd
FROM priced_events
GROUP BY hour, tenant_id, team, project, agent_id, provider, model, kind;

-- level is in the key: whole-GPU, MIG and per-process rows describe the same time at
-- different grains, so a reader picks one level and never adds them up.
-- @distributed cityHash64(tenant_id)
CREATE TABLE IF NOT EXISTS gpu_hourly
(
    hour DateTime64(3, 'UTC'),
    tenant_id LowCardinality(String),
    team LowCardinality(String),
    project LowCardinality(String),
    agent_id LowCardinality(String),
    session_id String,
    node LowCardinality(String),
    gpu_name LowCardinality(String),
    level LowCardinality(String),
    samples UInt64,
    gpu_seconds Decimal(38, 18),
    cost_usd Decimal(38, 18),
    energy_mj UInt64
)
ENGINE = SummingMergeTree
PARTITION BY toYYYYMM(hour)
ORDER BY (tenant_id, team, project, agent_id, session_id, node, gpu_name, level, hour);

CREATE MATERIALIZED VIEW IF NOT EXISTS gpu_hourly_mv TO gpu_hourly AS
SELECT
    toDateTime64(toStartOfHour(ts), 3, 'UTC') AS hour,
    tenant_id, team, project, agent_id, session_id, node, gpu_name, level,
    count() AS samples,
    sum(gpu_seconds) AS gpu_seconds,
    sum(cost_usd) AS cost_usd,
    sum(ifNull(energy_mj_delta, 0)) AS energy_mj
FROM gpu_samples
GROUP BY hour, tenant_id, team, project, agent_id, session_id, node, gpu_name, level;
