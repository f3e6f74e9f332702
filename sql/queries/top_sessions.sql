-- The most expensive agent sessions in [since, until): usage + attributed GPU cost + attributed CPU and memory
-- (compute_samples, `collect node`), from the attributed_spend view (migration 0020).
-- Parameters: since/until DateTime64(3), tenant/team/project String ('' = all), limit UInt32.
SELECT
    tenant_id,
    agent_id,
    session_id,
    min(ts) AS first_seen,
    max(ts) AS last_seen,
    countIf(source = 'usage') AS events,
    countIf(ok) AS ok_events,
    sum(usage_cost) AS usage_cost_usd,
    sum(gpu_cost) AS gpu_cost_usd,
    sum(compute_cost) AS compute_cost_usd,
    sum(usage_cost + gpu_cost + compute_cost) AS total_cost_usd
FROM attributed_spend(since = {since:DateTime64(3, 'UTC')}, until = {until:DateTime64(3, 'UTC')})
WHERE ({tenant:String} = '' OR tenant_id = {tenant:String})
  AND ({team:String} = '' OR team = {team:String})
  AND ({project:String} = '' OR project = {project:String})
GROUP BY tenant_id, agent_id, session_id
ORDER BY total_cost_usd DESC, session_id
LIMIT {limit:UInt32}
