-- GPU-hours, their cost, and how much of that was used, per device in [since, until).
-- Device rows (level = 'gpu') are what is paid for; process rows say who used it.
-- idle_cost_usd = cost x (100 - utilization) / 100 per sample: money paid for idle cycles.
-- Parameters: since/until DateTime64(3).
SELECT
    d.node AS node,
    d.gpu_uuid AS gpu_uuid,
    d.gpu_name AS gpu_name,
    d.hours AS gpu_hours,
    d.cost AS cost_usd,
    d.avg_util AS avg_utilization_pct,
    d.idle_cost AS idle_cost_usd,
    ifNull(p.attributed_hours, toDecimal128(0, 18)) AS attributed_gpu_hours,
    ifNull(p.n_sessions, 0) AS sessions,
    d.sim AS simulated
FROM
(
    SELECT node, gpu_uuid, any(gpu_name) AS gpu_name,
           sum(gpu_seconds) / 3600 AS hours,
           sum(cost_usd) AS cost,
           round(sumIf(toFloat64(utilization_pct) * toFloat64(gpu_seconds), utilization_pct IS NOT NULL)
                 / nullIf(sumIf(toFloat64(gpu_seconds), utilization_pct IS NOT NULL), 0), 1) AS avg_util,
           sum(cost_usd * (100 - ifNull(utilization_pct, 0)) / 100) AS idle_cost,
           max(simulated) AS sim
    FROM gpu_samples
    WHERE level = 'gpu' AND ts >= {since:DateTime64(3, 'UTC')} AND ts < {until:DateTime64(3, 'UTC')}
    GROUP BY node, gpu_uuid
) AS d
LEFT JOIN
(
    SELECT node, gpu_uuid, sumIf(gpu_seconds, attributed) / 3600 AS attributed_hours, uniqExactIf(session_id, attributed) AS n_sessions
    FROM gpu_samples
    WHERE level = 'process' AND ts >= {since:DateTime64(3, 'UTC')} AND ts < {until:DateTime64(3, 'UTC')}
    GROUP BY node, gpu_uuid
) AS p ON d.node = p.node AND d.gpu_uuid = p.gpu_uuid
ORDER BY cost_usd DESC, node, gpu_uuid
SETTINGS join_use_nulls = 1
