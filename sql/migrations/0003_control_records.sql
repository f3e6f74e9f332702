-- Spend snapshots, anomalies, throttle decisions, budget policy history and dead letters.

-- @distributed cityHash64(tenant_id)
CREATE TABLE IF NOT EXISTS spend_updates
(
    update_id UUID,
    ts DateTime64(3, 'UTC'),
    tenant_id LowCardinality(String),
    scope LowCardinality(String),
    scope_id String,
    window_start DateTime64(3, 'UTC'),
    window_end DateTime64(3, 'UTC'),
    window_cost_usd Decimal(38, 18),
    period_start DateTime64(3, 'UTC'),
    period_cost_usd Decimal(38, 18),
    events UInt64,
    input_tokens UInt64,
    output_tokens UInt64,
    gpu_seconds Decimal(38, 18),
    gpu_cost_usd Decimal(38, 18),
    unpriced_events UInt64,
    _topic LowCardinality(String),
    _partition UInt32,
    _offset UInt64,
    _batch_start UInt64,
    _ingested_at DateTime64(3, 'UTC') DEFAULT now64(3)
)
ENGINE = MergeTree
PARTITION BY toYYYYMM(ts)
ORDER BY (tenant_id, scope, scope_id, ts);

-- @distributed cityHash64(tenant_id)
CREATE TABLE IF NOT EXISTS anomalies
(
    anomaly_id UUID,
    ts DateTime64(3, 'UTC'),
    kind LowCardinality(String),
    severity LowCardinality(String),
    tenant_id LowCardinality(String),
    scope LowCardinality(String),
    scope_id String,
    window_start DateTime64(3, 'UTC'),
    window_end DateTime64(3, 'UTC'),
    evidence Map(String, String),
    message String,
    _topic LowCardinality(String),
    _partition UInt32,
    _offset UInt64,
    _batch_start UInt64,
    _ingested_at DateTime64(3, 'UTC') DEFAULT now64(3)
)
ENGINE = MergeTree
PARTITION BY toYYYYMM(ts)
ORDER BY (tenant_id, kind, ts);

-- priority '' means "every priority class" (None in the contract).
-- @distributed cityHash64(tenant_id)
CREATE TABLE IF NOT EXISTS throttle_decisions
(
    decision_id UUID,
    tenant_id LowCardinality(String),
    scope LowCardinality(String),
    scope_id String,
    priority LowCardinality(String),
    action LowCardinality(String),
    tokens_per_min Nullable(UInt64),
    requests_per_min Nullable(UInt64),
    max_concurrent Nullable(UInt64),
    max_model Nullable(String),
    reason String,
    policy_id String,
    budget_remaining_usd Nullable(Decimal(38, 18)),
    forecast_exhaustion_ts Nullable(DateTime64(3, 'UTC')),
    reset_at Nullable(DateTime64(3, 'UTC')),
    issued_at DateTime64(3, 'UTC'),
    expires_at DateTime64(3, 'UTC'),
    spend_limit_usd Nullable(Decimal(38, 18)),
    spent_usd Nullable(Decimal(38, 18)),
    session_lease_usd Nullable(Decimal(38, 18)),
    _topic LowCardinality(String),
    _partition UInt32,
    _offset UInt64,
    _batch_start UInt64,
    _ingested_at DateTime64(3, 'UTC') DEFAULT now64(3)
)
ENGINE = MergeTree
PARTITION BY toYYYYMM(issued_at)
ORDER BY (tenant_id, scope, scope_id, issued_at);

-- Every version of every budget policy (audit history); a tombstone on the compacted
-- budgets topic is stored as a row with deleted = true.
-- @distributed cityHash64(tenant_id)
CREATE TABLE IF NOT EXISTS budget_policies
(
    policy_id String,
    tenant_id LowCardinality(String),
    scope LowCardinality(String),
    scope_id String,
    unit LowCardinality(String),
    amount Decimal(38, 18),
    period LowCardinality(String),
    period_anchor Nullable(DateTime64(3, 'UTC')),
    period_seconds Nullable(UInt64),
    timezone LowCardinality(String),
    hard Bool,
    alert_thresholds_pct Array(UInt16),
    actions Map(LowCardinality(String), LowCardinality(String)),
    created_at DateTime64(3, 'UTC'),
    deleted Bool DEFAULT false,
    _topic LowCardinality(String),
    _partition UInt32,
    _offset UInt64,
    _batch_start UInt64,
    _ingested_at DateTime64(3, 'UTC') DEFAULT now64(3)
)
ENGINE = MergeTree
PARTITION BY toYYYYMM(created_at)
ORDER BY (tenant_id, policy_id, created_at);

-- @distributed rand()
CREATE TABLE IF NOT EXISTS dead_letters
(
    dlq_id UUID,
    ts DateTime64(3, 'UTC'),
    stage LowCardinality(String),
    source_topic LowCardinality(String),
    partition Int32,
    offset Int64,
    reason String,
    error_type LowCardinality(String),
    payload_b64 String,
    _topic LowCardinality(String),
    _partition UInt32,
    _offset UInt64,
    _batch_start UInt64,
    _ingested_at DateTime64(3, 'UTC') DEFAULT now64(3)
)
ENGINE = MergeTree
PARTITION BY toYYYYMM(ts)
ORDER BY (source_topic, stage, ts);
