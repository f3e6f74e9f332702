-- Who holds each GPU or MIG slice, and when (GpuAllocation; `meterline gpu assign`, `collect gpu --tenant`).
-- The `owner` idle policy charges the holder a device's idle time (sql/queries/gpu_idle_units.sql).
-- @distributed cityHash64(tenant_id)
CREATE TABLE IF NOT EXISTS gpu_allocations
(
    allocation_id String,
    node LowCardinality(String),
    gpu_uuid LowCardinality(String),
    mig_uuid LowCardinality(String),
    tenant_id LowCardinality(String),
    team LowCardinality(String),
    project LowCardinality(String),
    valid_from DateTime64(3, 'UTC'),
    valid_until Nullable(DateTime64(3, 'UTC')),
    created_at DateTime64(3, 'UTC'),
    _topic LowCardinality(String),
    _partition UInt32,
    _offset UInt64,
    _batch_start UInt64,
    _ingested_at DateTime64(3, 'UTC') DEFAULT now64(3)
)
ENGINE = MergeTree
PARTITION BY toYYYYMM(created_at)
ORDER BY (node, gpu_uuid, mig_uuid, valid_from);
