-- The most expensive agent sessions in [since, until): usage + attributed GPU cost + attributed CPU and memory
-- (compute_samples, `collect node`).
-- Parameters: since/until DateTime64(3), tenant/team/project String ('' = all), limit UInt32.
SELECT
    tenant_id,
    agent_id,
    session_id,
    min(first_ts) AS first_seen,
    max(last_ts) AS last_seen,
    sum(events) AS events,
    sum(ok_events) AS ok_events,
    sum(usage_cost) AS usage_cost_usd,
    sum(gpu_cost) AS gpu_cost_usd,
    sum(compute_cost) AS compute_cost_usd,
    sum(usage_cost + gpu_cost + compute_cost) AS total_cost_usd
FROM
(
    SELECT tenant_id, agent_id, session_id, min(ts) AS first_ts, max(ts) AS last_ts,
           count() AS events, countIf(status = 'ok') AS ok_events,
           sum(cost_usd) AS usage_cost, toDecimal128(0, 18) AS gpu_cost, toDecimal128(0, 18) AS compute_cost
    FROM priced_events
    WHERE ts >= {since:DateTime64(3, 'UTC')} AND ts < {until:DateTime64(3, 'UTC')}
      AND ({tenant:String} = '' OR tenant_id = {tenant:String})
      AND ({team:String} = '' OR team = {team:String})
      AND ({project:String} = '' OR project = {project:String})
    GROUP BY tenant_id, agent_id, session_id

    UNION ALL

    SELECT tenant_id, agent_id, session_id, min(ts), max(ts), 0, 0, toDecimal128(0, 18), sum(cost_usd), toDecimal128(0, 18)
    FROM gpu_samples
    WHERE level = 'process' AND attributed
      AND ts >= {since:DateTime64(3, 'UTC')} AND ts < {until:DateTime64(3, 'UTC')}
      AND ({tenant:String} = '' OR tenant_id = {tenant:String})
      AND ({team:String} = '' OR team = {team:String})
      AND ({project:String} = '' OR project = {project:String})
    GROUP BY tenant_id, agent_id, session_id

    UNION ALL

    SELECT tenant_id, agent_id, session_id, min(ts), max(ts), 0, 0, toDecimal128(0, 18), toDecimal128(0, 18), sum(cost_usd)
    FROM compute_samples
    WHERE attributed
      AND ts >= {since:DateTime64(3, 'UTC')} AND ts < {until:DateTime64(3, 'UTC')}
      AND ({tenant:String} = '' OR tenant_id = {tenant:String})
      AND ({team:String} = '' OR team = {team:String})
      AND ({project:String} = '' OR project = {project:String})
    GROUP BY tenant_id, agent_id, session_id
)
GROUP BY tenant_id, agent_id, session_id
ORDER BY total_cost_usd DESC, session_id
LIMIT {limit:UInt32}
