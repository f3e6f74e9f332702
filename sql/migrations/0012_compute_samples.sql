-- CPU and memory samples (ComputeSample fields, `meterline collect node`) with their exact cost, priced by
-- meterline.streams.pricing at ingest ($/vCPU-hour and $/GiB-hour of the node class); cost_usd = cpu + memory;
-- catalog_version says which catalog priced the row ('unpriced': a node class the catalog lacks, cost 0).
-- @distributed cityHash64(tenant_id)
CREATE TABLE IF NOT EXISTS compute_samples
(
    sample_id UUID,
    ts DateTime64(3, 'UTC'),
    node LowCardinality(String),
    node_class LowCardinality(String),
    level LowCardinality(String),
    pid Nullable(UInt32),
    cgroup String,
    container_id String,
    runtime LowCardinality(String),
    pod_uid String,
    namespace LowCardinality(String),
    pod String,
    interval_ms UInt32,
    cpu_user_seconds Decimal(38, 18),
    cpu_system_seconds Decimal(38, 18),
    memory_bytes UInt64,
    memory_peak_bytes UInt64,
    memory_byte_seconds Decimal(38, 18),
    tenant_id LowCardinality(String),
    team LowCardinality(String),
    project LowCardinality(String),
    agent_id LowCardinality(String),
    session_id String,
    attributed Bool,
    simulated Bool,
    cpu_cost_usd Decimal(38, 18),
    memory_cost_usd Decimal(38, 18),
    cost_usd Decimal(38, 18),
    catalog_version LowCardinality(String),
    _topic LowCardinality(String),
    _partition UInt32,
    _offset UInt64,
    _batch_start UInt64,
    _ingested_at DateTime64(3, 'UTC') DEFAULT now64(3)
)
ENGINE = MergeTree
PARTITION BY toYYYYMM(ts)
ORDER BY (tenant_id, team, project, session_id, ts);

-- @distributed cityHash64(tenant_id)
CREATE TABLE IF NOT EXISTS compute_sample_ids
(
    tenant_id LowCardinality(String),
    ts DateTime64(3, 'UTC'),
    sample_id UUID
)
ENGINE = ReplacingMergeTree
PARTITION BY toYYYYMM(ts)
ORDER BY (toStartOfHour(ts), sample_id);

CREATE MATERIALIZED VIEW IF NOT EXISTS compute_sample_ids_mv TO compute_sample_ids AS
SELECT tenant_id, ts, sample_id FROM compute_samples;
