-- Cost per successful action, per agent, in [since, until): everything the agent spent
-- (failed calls, its GPU time and its CPU and memory included) divided by the calls that succeeded
-- (the rows of the attributed_spend view, migration 0020).
-- Parameters: since/until DateTime64(3), tenant/team/project String ('' = all).
SELECT
    tenant_id,
    agent_id,
    countIf(source = 'usage') AS actions,
    countIf(ok) AS successful_actions,
    actions - successful_actions AS failed_actions,
    sum(usage_cost + gpu_cost + compute_cost) AS total_cost_usd,
    sumIf(usage_cost, source = 'usage' AND NOT ok) AS failed_cost_usd,
    if(successful_actions = 0, NULL, total_cost_usd / successful_actions) AS cost_per_success_usd
FROM attributed_spend(since = {since:DateTime64(3, 'UTC')}, until = {until:DateTime64(3, 'UTC')})
WHERE ({tenant:String} = '' OR tenant_id = {tenant:String})
  AND ({team:String} = '' OR team = {team:String})
  AND ({project:String} = '' OR project = {project:String})
GROUP BY tenant_id, agent_id
ORDER BY total_cost_usd DESC, agent_id
