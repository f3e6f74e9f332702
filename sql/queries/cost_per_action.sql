-- Cost per successful action, per agent, in [since, until): everything the agent spent
-- (failed calls, its GPU time and its CPU and memory included) divided by the calls that succeeded.
-- Parameters: since/until DateTime64(3), tenant/team/project String ('' = all).
SELECT
    tenant_id,
    agent_id,
    sum(n) AS actions,
    sum(n_ok) AS successful_actions,
    sum(n - n_ok) AS failed_actions,
    sum(usage_cost + gpu_cost) AS total_cost_usd,
    sum(failed_cost) AS failed_cost_usd,
    if(sum(n_ok) = 0, NULL, sum(usage_cost + gpu_cost) / sum(n_ok)) AS cost_per_success_usd
FROM
(
    SELECT tenant_id, agent_id, count() AS n, countIf(status = 'ok') AS n_ok,
           sum(cost_usd) AS usage_cost, sumIf(cost_usd, status != 'ok') AS failed_cost,
           toDecimal128(0, 18) AS gpu_cost
    FROM priced_events
    WHERE ts >= {since:DateTime64(3, 'UTC')} AND ts < {until:DateTime64(3, 'UTC')}
      AND ({tenant:String} = '' OR tenant_id = {tenant:String})
      AND ({team:String} = '' OR team = {team:String})
      AND ({project:String} = '' OR project = {project:String})
    GROUP BY tenant_id, agent_id

    UNION ALL

    SELECT tenant_id, agent_id, 0, 0, toDecimal128(0, 18), toDecimal128(0, 18), sum(cost_usd)
    FROM gpu_samples
    WHERE level = 'process' AND attributed
      AND ts >= {since:DateTime64(3, 'UTC')} AND ts < {until:DateTime64(3, 'UTC')}
      AND ({tenant:String} = '' OR tenant_id = {tenant:String})
      AND ({team:String} = '' OR team = {team:String})
      AND ({project:String} = '' OR project = {project:String})
    GROUP BY tenant_id, agent_id

    UNION ALL

    SELECT tenant_id, agent_id, 0, 0, toDecimal128(0, 18), toDecimal128(0, 18), sum(cost_usd)
    FROM compute_samples
    WHERE attributed
      AND ts >= {since:DateTime64(3, 'UTC')} AND ts < {until:DateTime64(3, 'UTC')}
      AND ({tenant:String} = '' OR tenant_id = {tenant:String})
      AND ({team:String} = '' OR team = {team:String})
      AND ({project:String} = '' OR project = {project:String})
    GROUP BY tenant_id, agent_id
)
GROUP BY tenant_id, agent_id
ORDER BY total_cost_usd DESC, agent_id
