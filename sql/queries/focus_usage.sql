-- FOCUS export, usage part: priced events per hour and charge line, cost components kept
-- apart (uncached text input, cache read, 5-minute and 1-hour cache writes, audio and image input,
-- text output, audio and image output, web searches) so each becomes its own FOCUS row. cost_source is in the key: catalog rows bill exactly their
-- list components; provider-reported rows are split in Python in proportion to them.
-- Parameters: since/until DateTime64(3), tenant String ('' = all).
SELECT
    toDateTime64(toStartOfHour(ts), 3, 'UTC') AS hour,
    tenant_id, team, project, agent_id, session_id, kind, provider, model, tool, priority, service_tier, batch,
    cost_source, catalog_version,
    count() AS events,
    sum(input_tokens - cache_read_tokens - cache_write_tokens - input_audio_tokens - input_image_tokens) AS uncached_input_qty,
    sum(cache_read_tokens) AS cache_read_qty,
    sum(cache_write_tokens - cache_write_1h_tokens) AS cache_write_qty,
    sum(cache_write_1h_tokens) AS cache_write_1h_qty,
    sum(input_audio_tokens) AS input_audio_qty,
    sum(input_image_tokens) AS input_image_qty,
    sum(output_tokens - output_audio_tokens - output_image_tokens) AS output_qty,
    sum(output_audio_tokens) AS output_audio_qty,
    sum(output_image_tokens) AS output_image_qty,
    sum(web_searches) AS web_search_qty,
    sum(units) AS units_qty,
    sum(cost_usd) AS billed_cost_usd,
    sum(list_cost_usd) AS list_cost_usd,
    sum(input_cost_usd) AS input_list_usd,
    sum(cache_read_cost_usd) AS cache_read_list_usd,
    sum(cache_write_cost_usd) AS cache_write_list_usd,
    sum(cache_write_1h_cost_usd) AS cache_write_1h_list_usd,
    sum(input_audio_cost_usd) AS input_audio_list_usd,
    sum(input_image_cost_usd) AS input_image_list_usd,
    sum(output_cost_usd) AS output_list_usd,
    sum(output_audio_cost_usd) AS output_audio_list_usd,
    sum(output_image_cost_usd) AS output_image_list_usd,
    sum(web_search_cost_usd) AS web_search_list_usd
FROM priced_events
WHERE ts >= {since:DateTime64(3, 'UTC')} AND ts < {until:DateTime64(3, 'UTC')}
  AND ({tenant:String} = '' OR tenant_id = {tenant:String})
GROUP BY hour, tenant_id, team, project, agent_id, session_id, kind, provider, model, tool, priority, service_tier, batch,
         cost_source, catalog_version
ORDER BY hour, tenant_id, team, project, agent_id, session_id, model, tool
