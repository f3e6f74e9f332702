-- FOCUS export, GPU part: attributed (and unattributed) per-process GPU time per hour.
-- GPU time without a tenant is tenant 'unattributed' (a parameter), as in the stream's spend and chargeback.
-- Parameters: since/until DateTime64(3), tenant String ('' = all), unattributed String.
SELECT
    toDateTime64(toStartOfHour(ts), 3, 'UTC') AS hour,
    tenant_id, team, project, agent_id, session_id, node, gpu_uuid, gpu_name, mig_profile,
    catalog_version, attributed, simulated,
    count() AS samples,
    sum(gpu_seconds) AS gpu_seconds,
    sum(cost_usd) AS billed_cost_usd
FROM
(
    SELECT * REPLACE (if(tenant_id = '', {unattributed:String}, tenant_id) AS tenant_id)
    FROM gpu_samples
    WHERE level = 'process' AND ts >= {since:DateTime64(3, 'UTC')} AND ts < {until:DateTime64(3, 'UTC')}
)
WHERE {tenant:String} = '' OR tenant_id = {tenant:String}
GROUP BY hour, tenant_id, team, project, agent_id, session_id, node, gpu_uuid, gpu_name, mig_profile, catalog_version, attributed, simulated
ORDER BY hour, tenant_id, session_id, node, gpu_uuid
