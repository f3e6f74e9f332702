-- Cost drivers: what the identity in app/drivers.py needs, per group, period and (for LLM calls) model.
-- level: 'tenant' | 'team' | 'agent'. Below tenant the key is qualified with its tenant ('acme/research',
-- 'acme/agent-1') so equal team names of two tenants stay two groups.
-- period: 'previous' is [prev_since, since), 'current' is [since, until).
-- kind: 'llm' (one row per provider/model, with tokens and price components), 'tool' (tool and API calls),
-- 'gpu' (per-process GPU samples; no owner is tenant 'unattributed', as in chargeback).
-- Parameters: level String, prev_since/since/until DateTime64(3), tenant/team/project String ('' = all),
-- unattributed String.
SELECT
    multiIf({level:String} = 'tenant', tenant_id,
            {level:String} = 'team', concat(tenant_id, '/', team),
            concat(tenant_id, '/', agent_id)) AS key,
    if(ts < {since:DateTime64(3, 'UTC')}, 'previous', 'current') AS period,
    row_kind AS kind,
    llm_provider AS provider,
    llm_model AS model,
    count() AS calls,
    sum(input_tokens) AS input_tokens,
    sum(output_tokens) AS output_tokens,
    sum(cache_read_tokens) AS cache_read_tokens,
    sum(cache_write_tokens) AS cache_write_tokens,
    sum(input_cost) AS input_cost_usd,
    sum(output_cost) AS output_cost_usd,
    sum(cache_read_cost) AS cache_read_cost_usd,
    sum(cache_write_cost) AS cache_write_cost_usd,
    sum(cost) AS cost_usd,
    sum(gpu_secs) AS gpu_seconds
FROM
(
    SELECT ts, tenant_id, team, agent_id,
           if(kind = 'llm_call', 'llm', 'tool') AS row_kind,  -- new names: an alias equal to a column shadows it
           if(kind = 'llm_call', provider, '') AS llm_provider,
           if(kind = 'llm_call', model, '') AS llm_model,
           input_tokens, output_tokens, cache_read_tokens, cache_write_tokens,
           input_cost_usd AS input_cost, output_cost_usd AS output_cost,
           cache_read_cost_usd AS cache_read_cost, cache_write_cost_usd AS cache_write_cost,
           cost_usd AS cost, toDecimal128(0, 18) AS gpu_secs
    FROM priced_events
    WHERE ts >= {prev_since:DateTime64(3, 'UTC')} AND ts < {until:DateTime64(3, 'UTC')}
      AND ({tenant:String} = '' OR tenant_id = {tenant:String})
      AND ({team:String} = '' OR team = {team:String})
      AND ({project:String} = '' OR project = {project:String})

    UNION ALL

    SELECT ts, tenant_id, team, agent_id, 'gpu', '', '',
           toUInt64(0), toUInt64(0), toUInt64(0), toUInt64(0),
           toDecimal128(0, 18), toDecimal128(0, 18), toDecimal128(0, 18), toDecimal128(0, 18),
           cost_usd, gpu_seconds
    FROM
    (
        SELECT ts, if(tenant_id = '', {unattributed:String}, tenant_id) AS tenant_id, team, agent_id, cost_usd, gpu_seconds
        FROM gpu_samples
        WHERE level = 'process'
          AND ts >= {prev_since:DateTime64(3, 'UTC')} AND ts < {until:DateTime64(3, 'UTC')}
          AND ({team:String} = '' OR team = {team:String})
          AND ({project:String} = '' OR project = {project:String})
    )
    WHERE {tenant:String} = '' OR tenant_id = {tenant:String}
)
GROUP BY key, period, row_kind, llm_provider, llm_model
ORDER BY key, period, kind, provider, model
