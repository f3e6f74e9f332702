-- GPU samples (GpuSample fields) with their GPU-seconds and exact cost, priced by
-- meterline.streams.pricing at ingest; catalog_version says which catalog priced the row.
-- @distributed cityHash64(tenant_id)
CREATE TABLE IF NOT EXISTS gpu_samples
(
    sample_id UUID,
    ts DateTime64(3, 'UTC'),
    node LowCardinality(String),
    level LowCardinality(String),
    gpu_index UInt16,
    gpu_uuid LowCardinality(String),
    gpu_name LowCardinality(String),
    mig_uuid LowCardinality(String),
    mig_profile LowCardinality(String),
    mig_slices UInt16,
    mig_total_slices UInt16,
    interval_ms UInt32,
    utilization_pct Nullable(UInt8),
    memory_used_bytes Nullable(UInt64),
    memory_total_bytes Nullable(UInt64),
    power_mw Nullable(UInt64),
    energy_mj_delta Nullable(UInt64),
    temperature_c Nullable(Int16),
    pid Nullable(UInt32),
    process_memory_bytes Nullable(UInt64),
    sm_util_pct Nullable(UInt8),
    tenant_id LowCardinality(String),
    team LowCardinality(String),
    project LowCardinality(String),
    agent_id LowCardinality(String),
    session_id String,
    attributed Bool,
    simulated Bool,
    gpu_seconds Decimal(38, 18),
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
CREATE TABLE IF NOT EXISTS gpu_sample_ids
(
    tenant_id LowCardinality(String),
    ts DateTime64(3, 'UTC'),
    sample_id UUID
)
ENGINE = ReplacingMergeTree
PARTITION BY toYYYYMM(ts)
ORDER BY (toStartOfHour(ts), sample_id);

CREATE MATERIALIZED VIEW IF NOT EXISTS gpu_sample_ids_mv TO gpu_sample_ids AS
SELECT tenant_id, ts, sample_id FROM gpu_samples;
