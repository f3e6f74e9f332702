-- The model a budget scope spends most on over the last hour (what `downgrade` steps down from).
-- Parameters: tenant, team, project, agent, session String; depth UInt8 (as in scope_spend.sql); since DateTime64(3).
SELECT model, sum(cost_usd) AS cost_usd
FROM priced_events
WHERE kind = 'llm_call' AND ts >= {since:DateTime64(3, 'UTC')}
  AND tenant_id = {tenant:String}
  AND ({depth:UInt8} < 1 OR team = {team:String})
  AND ({depth:UInt8} < 2 OR project = {project:String})
  AND ({depth:UInt8} < 3 OR agent_id = {agent:String})
  AND ({depth:UInt8} < 4 OR session_id = {session:String})
GROUP BY model
ORDER BY cost_usd DESC, model
LIMIT 1
