-- FOCUS export, CPU and memory part: per hour, session and node, the CPU-seconds and memory byte-seconds of
-- compute_samples (`collect node`) with their costs. Without a tenant: tenant 'unattributed' (a parameter).
-- Parameters: since/until DateTime64(3), tenant String ('' = all), unattributed String.
SELECT
    toDateTime64(toStartOfHour(ts), 3, 'UTC') AS hour,
    tenant_id, team, project, agent_id, session_id, node, node_class, catalog_version, attributed, simulated,
    count() AS samples,
    sum(cpu_user_seconds + cpu_system_seconds) AS cpu_seconds,
    sum(memory_byte_seconds) AS memory_byte_seconds,
    sum(cpu_cost_usd) AS cpu_cost_usd,
    sum(memory_cost_usd) AS memory_cost_usd
FROM
(
    SELECT * REPLACE (if(tenant_id = '', {unattributed:String}, tenant_id) AS tenant_id)
    FROM compute_samples
    WHERE ts >= {since:DateTime64(3, 'UTC')} AND ts < {until:DateTime64(3, 'UTC')}
)
WHERE {tenant:String} = '' OR tenant_id = {tenant:String}
GROUP BY hour, tenant_id, team, project, agent_id, session_id, node, node_class, catalog_version, attributed, simulated
ORDER BY hour, tenant_id, session_id, node
