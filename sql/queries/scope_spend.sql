-- Spend of one budget scope in [since, until), in equal buckets for a burn-down: usage cost
-- plus attributed GPU, CPU and memory cost (what the stream's spend counts), GPU-hours and vCPU-hours, per bucket. A scope is the path of its levels
-- (tenant/team/project/agent/session, as the allocator writes scope ids); depth says how
-- many levels below the tenant must match, an empty level matches only an empty value.
-- Parameters: tenant, team, project, agent, session String; depth UInt8 (0 = tenant ... 4 = session);
-- since/until DateTime64(3); bucket_seconds UInt32.
SELECT
    toDateTime64(toStartOfInterval(ts, toIntervalSecond({bucket_seconds:UInt32}), 'UTC'), 3, 'UTC') AS bucket,
    sum(usage_cost + gpu_cost) AS cost_usd,
    sum(gpu_secs) / 3600 AS gpu_hours,
    sum(cpu_secs) / 3600 AS vcpu_hours
FROM
(
    SELECT ts, tenant_id, team, project, agent_id, session_id,
           cost_usd AS usage_cost, toDecimal128(0, 18) AS gpu_cost, toDecimal128(0, 18) AS gpu_secs, toDecimal128(0, 18) AS cpu_secs
    FROM priced_events
    WHERE ts >= {since:DateTime64(3, 'UTC')} AND ts < {until:DateTime64(3, 'UTC')}
    UNION ALL
    SELECT ts, tenant_id, team, project, agent_id, session_id, toDecimal128(0, 18), cost_usd, gpu_seconds, toDecimal128(0, 18)
    FROM gpu_samples
    WHERE level = 'process' AND attributed AND ts >= {since:DateTime64(3, 'UTC')} AND ts < {until:DateTime64(3, 'UTC')}
    UNION ALL
    SELECT ts, tenant_id, team, project, agent_id, session_id, toDecimal128(0, 18), cpu_cost_usd + memory_cost_usd,
           toDecimal128(0, 18), cpu_user_seconds + cpu_system_seconds
    FROM compute_samples
    WHERE attributed AND ts >= {since:DateTime64(3, 'UTC')} AND ts < {until:DateTime64(3, 'UTC')}
)
WHERE tenant_id = {tenant:String}
  AND ({depth:UInt8} < 1 OR team = {team:String})
  AND ({depth:UInt8} < 2 OR project = {project:String})
  AND ({depth:UInt8} < 3 OR agent_id = {agent:String})
  AND ({depth:UInt8} < 4 OR session_id = {session:String})
GROUP BY bucket
ORDER BY bucket
