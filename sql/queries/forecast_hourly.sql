-- Hourly spend per key from the rollups, for `meterline forecast` (app/forecast.py): usage_hourly plus
-- process-level gpu_hourly (the grain that carries attribution; time without a tenant is the tenant
-- 'unattributed', as in chargeback). by = model (GPU time as 'gpu:<name>'), or a level of the tenant path at
-- `depth` (1 tenant ... 4 agent): keys below the tenant are scope ids ('acme/research').
-- Rollup rows of one key may not be merged yet, so everything is read with sum() and GROUP BY.
-- Parameters: by String, depth UInt8, tenant String ('' = all), since/until DateTime64(3), unattributed String.
SELECT key, hour, sum(cost) AS cost_usd
FROM
(
    SELECT if({by:String} = 'model', toString(model),
              arrayStringConcat(arraySlice([toString(tenant_id), toString(team), toString(project), toString(agent_id)], 1, {depth:UInt8}), '/')) AS key,
           hour, cost_usd AS cost
    FROM usage_hourly
    WHERE hour >= {since:DateTime64(3, 'UTC')} AND hour < {until:DateTime64(3, 'UTC')}
      AND ({tenant:String} = '' OR tenant_id = {tenant:String})

    UNION ALL

    SELECT if({by:String} = 'model', concat('gpu:', gpu_name), arrayStringConcat(arraySlice([tenant, team, project, agent_id], 1, {depth:UInt8}), '/')),
           hour, cost_usd
    FROM
    (
        SELECT if(tenant_id = '', {unattributed:String}, toString(tenant_id)) AS tenant, toString(team) AS team,
               toString(project) AS project, toString(agent_id) AS agent_id, toString(gpu_name) AS gpu_name, hour, cost_usd
        FROM gpu_hourly
        WHERE level = 'process' AND hour >= {since:DateTime64(3, 'UTC')} AND hour < {until:DateTime64(3, 'UTC')}
    )
    WHERE {tenant:String} = '' OR tenant = {tenant:String}
)
GROUP BY key, hour
ORDER BY key, hour
