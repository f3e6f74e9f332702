-- Spend of one budget scope in [since, until), in equal buckets for a burn-down: usage cost
-- plus attributed GPU, CPU and memory cost (what the stream's spend counts), GPU-seconds and CPU-seconds, per bucket
-- (the rows of the attributed_spend view, migration 0020). Seconds, not hours: a sum of per-bucket hours would
-- truncate each bucket at 18 places and under-count an hour budget; the reader divides the total once. A scope is the path of its levels
-- (tenant/team/project/agent/session, as the allocator writes scope ids); depth says how
-- many levels below the tenant must match, an empty level matches only an empty value.
-- Parameters: tenant, team, project, agent, session String; depth UInt8 (0 = tenant ... 4 = session);
-- since/until DateTime64(3); bucket_seconds UInt32.
SELECT
    toDateTime64(toStartOfInterval(ts, toIntervalSecond({bucket_seconds:UInt32}), 'UTC'), 3, 'UTC') AS bucket,
    sum(usage_cost + gpu_cost + compute_cost) AS cost_usd,
    sum(gpu_seconds) AS gpu_seconds,
    sum(cpu_seconds) AS cpu_seconds
FROM attributed_spend(since = {since:DateTime64(3, 'UTC')}, until = {until:DateTime64(3, 'UTC')})
WHERE tenant_id = {tenant:String}
  AND ({depth:UInt8} < 1 OR team = {team:String})
  AND ({depth:UInt8} < 2 OR project = {project:String})
  AND ({depth:UInt8} < 3 OR agent_id = {agent:String})
  AND ({depth:UInt8} < 4 OR session_id = {session:String})
GROUP BY bucket
ORDER BY bucket
