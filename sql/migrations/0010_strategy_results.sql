-- What-if results of `meterline simulate strategies --store` (allocator/strategies.py): one row per strategy
-- per run, every metric of the seed's strategy table. Read by Grafana and `report strategies` (the web page).
-- Money is exact (paid GPU-ms x $/hour); the metrics are floats.
-- @distributed cityHash64(run_id)
CREATE TABLE IF NOT EXISTS strategy_results
(
    run_id String,
    ts DateTime64(3, 'UTC'),
    source String,
    seed UInt64,
    gpu LowCardinality(String),
    on_demand_usd_hour Decimal(38, 18),
    spot_usd_hour Decimal(38, 18),
    strategy LowCardinality(String),
    cost_usd Decimal(38, 18),
    gpu_hours_paid Decimal(38, 18),
    daily_cost_cv Float64,
    critical_p99_wait_s Float64,
    slo_s Float64,
    slo_met_pct Float64,
    utilisation_pct Float64,
    batch_lost_pct Float64,
    savings_vs_static_pct Float64,
    deadline_misses UInt32,
    interruptions UInt32,
    on_demand_fallbacks UInt32
)
ENGINE = MergeTree
PARTITION BY toYYYYMM(ts)
ORDER BY (ts, run_id, strategy);
