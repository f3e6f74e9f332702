-- Spend of one budget scope in [since, until), in equal buckets for a burn-down:
-- usage cost plus attributed GPU cost, and GPU-hours, per bucket.
-- Parameters: column Identifier (tenant_id | team | project | agent_id | session_id), tenant String,
-- scope_id String, since/until DateTime64(3), bucket_seconds UInt32.
SELECT
    toDateTime64(toStartOfInterval(ts, toIntervalSecond({bucket_seconds:UInt32}), 'UTC'), 3, 'UTC') AS bucket,
    sum(usage_cost_usd) + sum(gpu_cost_usd) AS cost_usd,
    sum(gpu_seconds) / 3600 AS gpu_hours
FROM
(
    SELECT ts, cost_usd AS usage_cost_usd, toDecimal128(0, 18) AS gpu_cost_usd, toDecimal128(0, 18) AS gpu_seconds
    FROM priced_events
    WHERE tenant_id = {tenant:String} AND {column:Identifier} = {scope_id:String}
      AND ts >= {since:DateTime64(3, 'UTC')} AND ts < {until:DateTime64(3, 'UTC')}
    UNION ALL
    SELECT ts, toDecimal128(0, 18), cost_usd, gpu_seconds
    FROM gpu_samples
    WHERE level = 'process' AND attributed AND tenant_id = {tenant:String} AND {column:Identifier} = {scope_id:String}
      AND ts >= {since:DateTime64(3, 'UTC')} AND ts < {until:DateTime64(3, 'UTC')}
)
GROUP BY bucket
ORDER BY bucket
