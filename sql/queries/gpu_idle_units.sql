-- GPU time charged to no process, per unit (a whole device, or one MIG slice), hour and holder, in [since, until).
-- A unit's idle = its own cost - what is charged below it: a device less its MIG slices and the processes on
-- it, a slice less the processes on it. Summed over units that is every device's cost less every process
-- row's cost, exactly, so chargeback (process + idle) adds up to `report gpu`. app/gpu_idle.py allocates
-- these by the idle policy. holder: the newest gpu_allocations record covering the sample, the slice's own
-- before its device's ('' = nobody holds it). Periods are hours clipped to the window (never overlapping).
-- Parameters: since/until DateTime64(3).
SELECT
    greatest(toDateTime64(toStartOfHour(ts), 3, 'UTC'), {since:DateTime64(3, 'UTC')}) AS period_start,
    least(toDateTime64(toStartOfHour(ts), 3, 'UTC') + INTERVAL 1 HOUR, {until:DateTime64(3, 'UTC')}) AS period_end,
    node, gpu_uuid, mig_uuid, gpu_name,
    holder.1 AS tenant_id, holder.2 AS team, holder.3 AS project,
    any(catalog_version) AS catalog_version,
    sum(seconds) AS gpu_seconds,
    sum(cost) AS cost_usd
FROM
(
    SELECT u.ts AS ts, u.node AS node, u.gpu_uuid AS gpu_uuid, u.mig_uuid AS mig_uuid, u.gpu_name AS gpu_name,
           u.catalog_version AS catalog_version, u.seconds AS seconds, u.cost AS cost,
           argMaxIf((a.tenant_id, a.team, a.project), a.created_at, a.mig_uuid = u.mig_uuid AND u.mig_uuid != ''
                    AND u.ts >= a.valid_from AND (a.valid_until IS NULL OR u.ts < a.valid_until)) AS own,
           argMaxIf((a.tenant_id, a.team, a.project), a.created_at, a.mig_uuid = ''
                    AND u.ts >= a.valid_from AND (a.valid_until IS NULL OR u.ts < a.valid_until)) AS device,
           if(own.1 != '', own, device) AS holder
    FROM
    (
        SELECT ts, node, gpu_uuid, unit AS mig_uuid, anyIf(gpu_name, sign > 0) AS gpu_name,
               anyIf(catalog_version, sign > 0) AS catalog_version,
               sum(sign * gpu_seconds) AS seconds, sum(sign * cost_usd) AS cost
        FROM
        (
            SELECT ts, node, gpu_uuid, gpu_name, catalog_version, gpu_seconds, cost_usd,
                   arrayJoin(multiIf(level = 'gpu', [('', 1)],
                                     level = 'mig', [(mig_uuid, 1), ('', -1)],   -- a slice: its own unit, out of its device's
                                     [(mig_uuid, -1)])) AS part,                 -- a process: out of the unit it runs on
                   part.1 AS unit, toInt8(part.2) AS sign
            FROM gpu_samples
            WHERE ts >= {since:DateTime64(3, 'UTC')} AND ts < {until:DateTime64(3, 'UTC')}
        )
        GROUP BY ts, node, gpu_uuid, unit
    ) AS u
    LEFT JOIN gpu_allocations AS a ON a.node = u.node AND a.gpu_uuid = u.gpu_uuid
    GROUP BY u.ts, u.node, u.gpu_uuid, u.mig_uuid, u.gpu_name, u.catalog_version, u.seconds, u.cost
)
GROUP BY period_start, period_end, node, gpu_uuid, mig_uuid, gpu_name, holder
HAVING cost_usd != 0 OR gpu_seconds != 0
ORDER BY period_start, node, gpu_uuid, mig_uuid, tenant_id, team, project
