-- Chargeback: spend per key in [since, until). by = model, or a level of the tenant path at `depth` (1 tenant,
-- 2 team ... 5 session): keys below the tenant are scope ids ('acme/research', schemas/scopes.py), so teams of
-- different tenants never add up. Idle GPU time is added to these lines by app/gpu_idle.py.
-- Usage cost comes from priced_events (every priced row, exact Decimal); GPU cost from
-- per-process gpu_samples (the grain that carries attribution). GPU time without a tenant is
-- tenant 'unattributed' (a parameter: the stream's spend name for it); --tenant filters on that name.
-- CPU and memory come from compute_samples (`collect node`, priced at ingest per node class), without a tenant
-- likewise 'unattributed'. By model, GPU time appears as its own line ('gpu:<name>'), CPU and memory as
-- 'compute:<node class>'. By namespace (or pod, 'namespace/pod'): the Kubernetes pod of GPU process rows (`collect dcgm`)
-- and compute rows (`collect node` on a Kubernetes node); tokens, tools, idle GPU time and rows outside any pod have
-- namespace '' (shown as "(none)" in tables). reasoning, audio and image output tokens are part of
-- output_tokens, audio/image input and cache tokens of input_tokens, 1-hour cache writes of cache_write_tokens;
-- unmetered_events completed with no usage reported (their cost is unknown, see the unmetered_calls anomaly).
-- Parameters: by String (model, namespace, pod or a level), depth UInt8, since/until DateTime64(3), tenant/team/project String ('' = all), unattributed String.
SELECT
    key,
    sum(events) AS events,
    sum(ok_events) AS ok_events,
    sum(input_tokens) AS input_tokens,
    sum(output_tokens) AS output_tokens,
    sum(reasoning_tokens) AS reasoning_tokens,
    sum(cache_read_tokens) AS cache_read_tokens,
    sum(cache_write_tokens) AS cache_write_tokens,
    sum(cache_write_1h_tokens) AS cache_write_1h_tokens,
    sum(input_audio_tokens) AS input_audio_tokens,
    sum(input_image_tokens) AS input_image_tokens,
    sum(output_audio_tokens) AS output_audio_tokens,
    sum(output_image_tokens) AS output_image_tokens,
    sum(web_searches) AS web_searches,
    sum(batch_events) AS batch_events,
    sum(unpriced_events) AS unpriced_events,
    sum(unmetered_events) AS unmetered_events,
    sum(usage_cost) AS usage_cost_usd,
    sum(gpu_secs) AS gpu_seconds,
    sum(gpu_cost) AS gpu_cost_usd,
    sum(cpu_secs) AS cpu_seconds,
    sum(cpu_cost) AS cpu_cost_usd,
    sum(memory_cost) AS memory_cost_usd,
    sum(usage_cost + gpu_cost + cpu_cost + memory_cost) AS total_cost_usd
FROM
(
    SELECT
        multiIf({by:String} = 'model', model, {by:String} IN ('namespace', 'pod'), '',
                arrayStringConcat(arraySlice([tenant_id, team, project, agent_id, session_id], 1, {depth:UInt8}), '/')) AS key,
        count() AS events,
        countIf(status = 'ok') AS ok_events,
        sum(input_tokens) AS input_tokens,
        sum(output_tokens) AS output_tokens,
        sum(reasoning_tokens) AS reasoning_tokens,
        sum(cache_read_tokens) AS cache_read_tokens,
        sum(cache_write_tokens) AS cache_write_tokens,
        sum(cache_write_1h_tokens) AS cache_write_1h_tokens,
        sum(input_audio_tokens) AS input_audio_tokens,
        sum(input_image_tokens) AS input_image_tokens,
        sum(output_audio_tokens) AS output_audio_tokens,
        sum(output_image_tokens) AS output_image_tokens,
        sum(web_searches) AS web_searches,
        countIf(batch) AS batch_events,
        countIf(cost_source = 'unpriced') AS unpriced_events,
        countIf(usage = 'missing') AS unmetered_events,
        sum(cost_usd) AS usage_cost,
        toDecimal128(0, 18) AS gpu_secs,
        toDecimal128(0, 18) AS gpu_cost,
        toDecimal128(0, 18) AS cpu_secs,
        toDecimal128(0, 18) AS cpu_cost,
        toDecimal128(0, 18) AS memory_cost
    FROM priced_events
    WHERE ts >= {since:DateTime64(3, 'UTC')} AND ts < {until:DateTime64(3, 'UTC')}
      AND ({tenant:String} = '' OR tenant_id = {tenant:String})
      AND ({team:String} = '' OR team = {team:String})
      AND ({project:String} = '' OR project = {project:String})
    GROUP BY key

    UNION ALL

    SELECT
        multiIf({by:String} = 'model', model, {by:String} = 'namespace', namespace,
                {by:String} = 'pod', if(pod = '', '', concat(namespace, '/', pod)),
                arrayStringConcat(arraySlice([tenant_id, team, project, agent_id, session_id], 1, {depth:UInt8}), '/')) AS key,
        0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
        toDecimal128(0, 18),
        sum(gpu_seconds),
        sum(cost_usd),
        toDecimal128(0, 18), toDecimal128(0, 18), toDecimal128(0, 18)
    FROM
    (
        SELECT if(tenant_id = '', {unattributed:String}, tenant_id) AS tenant_id, team, project, agent_id, session_id,
               concat('gpu:', gpu_name) AS model, namespace, pod, gpu_seconds, cost_usd
        FROM gpu_samples
        WHERE level = 'process'
          AND ts >= {since:DateTime64(3, 'UTC')} AND ts < {until:DateTime64(3, 'UTC')}
          AND ({team:String} = '' OR team = {team:String})
          AND ({project:String} = '' OR project = {project:String})
    )
    WHERE {tenant:String} = '' OR tenant_id = {tenant:String}
    GROUP BY key

    UNION ALL

    SELECT
        multiIf({by:String} = 'model', model, {by:String} = 'namespace', namespace,
                {by:String} = 'pod', if(pod = '', '', concat(namespace, '/', pod)),
                arrayStringConcat(arraySlice([tenant_id, team, project, agent_id, session_id], 1, {depth:UInt8}), '/')) AS key,
        0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
        toDecimal128(0, 18), toDecimal128(0, 18), toDecimal128(0, 18),
        sum(cpu_user_seconds + cpu_system_seconds),
        sum(cpu_cost_usd),
        sum(memory_cost_usd)
    FROM
    (
        SELECT if(tenant_id = '', {unattributed:String}, tenant_id) AS tenant_id, team, project, agent_id, session_id,
               concat('compute:', node_class) AS model, namespace, pod, cpu_user_seconds, cpu_system_seconds, cpu_cost_usd, memory_cost_usd
        FROM compute_samples
        WHERE ts >= {since:DateTime64(3, 'UTC')} AND ts < {until:DateTime64(3, 'UTC')}
          AND ({team:String} = '' OR team = {team:String})
          AND ({project:String} = '' OR project = {project:String})
    )
    WHERE {tenant:String} = '' OR tenant_id = {tenant:String}
    GROUP BY key
)
GROUP BY key
ORDER BY total_cost_usd DESC, key
