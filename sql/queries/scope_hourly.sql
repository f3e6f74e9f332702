-- Hourly spend of one budget scope from the rollups, for the burn-down's forecast band (app/forecast.py):
-- usage cost plus process-level GPU cost and CPU and memory cost, GPU-hours and vCPU-hours (compute samples have no
-- rollup: read per hour from compute_samples). The scope filter is scope_spend.sql's (depth 0 tenant
-- ... 3 agent; the rollups carry no session, so session budgets get no band).
-- Parameters: tenant, team, project, agent String; depth UInt8; since/until DateTime64(3).
SELECT hour, sum(cost) AS cost_usd, sum(gpu_secs) / 3600 AS gpu_hours, sum(cpu_secs) / 3600 AS vcpu_hours
FROM
(
    SELECT hour, tenant_id, team, project, agent_id, cost_usd AS cost, toDecimal128(0, 18) AS gpu_secs, toDecimal128(0, 18) AS cpu_secs
    FROM usage_hourly
    WHERE hour >= {since:DateTime64(3, 'UTC')} AND hour < {until:DateTime64(3, 'UTC')}
    UNION ALL
    SELECT hour, tenant_id, team, project, agent_id, cost_usd, gpu_seconds, toDecimal128(0, 18)
    FROM gpu_hourly
    WHERE level = 'process' AND hour >= {since:DateTime64(3, 'UTC')} AND hour < {until:DateTime64(3, 'UTC')}
    UNION ALL
    SELECT toDateTime64(toStartOfHour(ts), 3, 'UTC'), tenant_id, team, project, agent_id, cpu_cost_usd + memory_cost_usd,
           toDecimal128(0, 18), cpu_user_seconds + cpu_system_seconds
    FROM compute_samples
    WHERE attributed AND ts >= {since:DateTime64(3, 'UTC')} AND ts < {until:DateTime64(3, 'UTC')}
)
WHERE tenant_id = {tenant:String}
  AND ({depth:UInt8} < 1 OR team = {team:String})
  AND ({depth:UInt8} < 2 OR project = {project:String})
  AND ({depth:UInt8} < 3 OR agent_id = {agent:String})
GROUP BY hour
ORDER BY hour
