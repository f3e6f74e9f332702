-- Who used each GPU device in each hour of [since, until), by the cost of their process rows: the shares the
-- `proportional` idle policy spreads a device's idle time by (app/gpu_idle.py). Unattributed processes are
-- nobody's share. Parameters: since/until DateTime64(3).
SELECT
    greatest(toDateTime64(toStartOfHour(ts), 3, 'UTC'), {since:DateTime64(3, 'UTC')}) AS period_start,
    node, gpu_uuid, tenant_id,
    sum(cost_usd) AS cost_usd
FROM gpu_samples
WHERE level = 'process' AND tenant_id != '' AND ts >= {since:DateTime64(3, 'UTC')} AND ts < {until:DateTime64(3, 'UTC')}
GROUP BY period_start, node, gpu_uuid, tenant_id
HAVING cost_usd > 0
ORDER BY period_start, node, gpu_uuid, tenant_id
