-- LLM calls of one budget scope in [since, until) made under one of its downgrade decisions: the call's model is
-- the decision's max_model, its time within [issued_at, expires_at) of a copy of the decision (heartbeats
-- re-publish it with fresh times; each copy is a row), and its class the decision's ('' = every class). One row
-- per call (the newest covering copy names the decision), with the fields the pricer needs to price it again at
-- the model it stood in for (`downgraded_from`). Parameters: tenant, team, project, agent, session String;
-- depth UInt8 (0 tenant ... 4 session); scope_id String (the policy's); since/until DateTime64(3).
SELECT toString(e.event_id) AS event_id, any(e.ts) AS ts, any(e.provider) AS provider, any(e.model) AS model,
       any(e.input_tokens) AS input_tokens, any(e.output_tokens) AS output_tokens,
       any(e.cache_read_tokens) AS cache_read_tokens, any(e.cache_write_tokens) AS cache_write_tokens,
       any(e.reasoning_tokens) AS reasoning_tokens, any(e.cache_write_1h_tokens) AS cache_write_1h_tokens,
       any(e.input_audio_tokens) AS input_audio_tokens, any(e.input_image_tokens) AS input_image_tokens,
       any(e.output_audio_tokens) AS output_audio_tokens, any(e.output_image_tokens) AS output_image_tokens,
       any(e.web_searches) AS web_searches, any(e.service_tier) AS service_tier, any(e.batch) AS batch,
       any(e.cost_usd) AS cost_usd,
       argMax(d.downgraded_from, d.issued_at) AS downgraded_from, toString(argMax(d.decision_id, d.issued_at)) AS decision_id
FROM
(
    SELECT event_id, ts, toString(provider) AS provider, toString(model) AS model, toString(priority) AS priority,
           input_tokens, output_tokens, cache_read_tokens, cache_write_tokens, reasoning_tokens, cache_write_1h_tokens,
           input_audio_tokens, input_image_tokens, output_audio_tokens, output_image_tokens, web_searches,
           toString(service_tier) AS service_tier, batch, cost_usd
    FROM priced_events
    WHERE kind = 'llm_call' AND ts >= {since:DateTime64(3, 'UTC')} AND ts < {until:DateTime64(3, 'UTC')}
      AND tenant_id = {tenant:String}
      AND ({depth:UInt8} < 1 OR team = {team:String})
      AND ({depth:UInt8} < 2 OR project = {project:String})
      AND ({depth:UInt8} < 3 OR agent_id = {agent:String})
      AND ({depth:UInt8} < 4 OR session_id = {session:String})
) AS e
INNER JOIN
(
    SELECT decision_id, toString(priority) AS priority, assumeNotNull(max_model) AS max_model,
           assumeNotNull(downgraded_from) AS downgraded_from, issued_at, expires_at
    FROM throttle_decisions
    WHERE action = 'downgrade' AND max_model IS NOT NULL AND downgraded_from IS NOT NULL
      AND tenant_id = {tenant:String} AND scope_id = {scope_id:String}
      AND issued_at < {until:DateTime64(3, 'UTC')} AND expires_at > {since:DateTime64(3, 'UTC')}
) AS d ON e.model = d.max_model
WHERE e.ts >= d.issued_at AND e.ts < d.expires_at AND (d.priority = '' OR d.priority = e.priority)
GROUP BY e.event_id
ORDER BY ts, event_id
