-- `meterline dlq replay` (sql/dlq.py) re-produces dead letters to their source topics; every consumer of a topic it
-- replays to must count a record once. priced, gpu and compute have their id tables; anomalies get one here, so a
-- replayed anomaly the ledger holds already is dropped like a repeated event_id (sql/sink.py, first write wins).
-- @distributed cityHash64(tenant_id)
CREATE TABLE IF NOT EXISTS anomaly_ids
(
    tenant_id LowCardinality(String),
    ts DateTime64(3, 'UTC'),
    anomaly_id UUID
)
ENGINE = ReplacingMergeTree
PARTITION BY toYYYYMM(ts)
ORDER BY (toStartOfHour(ts), anomaly_id);

CREATE MATERIALIZED VIEW IF NOT EXISTS anomaly_ids_mv TO anomaly_ids AS
SELECT tenant_id, ts, anomaly_id FROM anomalies;

-- The anomalies stored before this migration (on a cluster: this node's shard; run it against each shard).
INSERT INTO anomaly_ids SELECT tenant_id, ts, anomaly_id FROM anomalies;

-- One claim per replayed record, keyed by where it came from (source topic:partition:offset, or dlq:<dlq_id> for an
-- output the worker could not produce): the first claim wins, so a second `replay --yes` re-produces nothing.
-- @distributed cityHash64(replay_key)
CREATE TABLE IF NOT EXISTS dlq_replays
(
    replay_key String,
    dlq_id UUID,
    stage LowCardinality(String),
    source_topic LowCardinality(String),
    partition Int32,
    offset Int64,
    replay_id UUID,
    replayed_at DateTime64(3, 'UTC'),
    replayed_by String
)
ENGINE = MergeTree
ORDER BY (replay_key, replayed_at);
