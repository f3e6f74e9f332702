-- The rest of the price sheet (issue 13 item 4): 1-hour cache writes (a subset of cache_write_tokens),
-- uncached audio/image input and audio/image output tokens (subsets of input/output), web searches of an
-- LLM call, the service tier and batch flag that chose the price, and a cost column for each new
-- component (cache_write_cost_usd is now the 5-minute writes only; all components add up to list_cost_usd).
-- @distributed cityHash64(tenant_id)
ALTER TABLE priced_events ADD COLUMN IF NOT EXISTS cache_write_1h_tokens UInt64 DEFAULT 0 AFTER reasoning_tokens;
-- @distributed cityHash64(tenant_id)
ALTER TABLE priced_events ADD COLUMN IF NOT EXISTS input_audio_tokens UInt64 DEFAULT 0 AFTER cache_write_1h_tokens;
-- @distributed cityHash64(tenant_id)
ALTER TABLE priced_events ADD COLUMN IF NOT EXISTS input_image_tokens UInt64 DEFAULT 0 AFTER input_audio_tokens;
-- @distributed cityHash64(tenant_id)
ALTER TABLE priced_events ADD COLUMN IF NOT EXISTS output_audio_tokens UInt64 DEFAULT 0 AFTER input_image_tokens;
-- @distributed cityHash64(tenant_id)
ALTER TABLE priced_events ADD COLUMN IF NOT EXISTS output_image_tokens UInt64 DEFAULT 0 AFTER output_audio_tokens;
-- @distributed cityHash64(tenant_id)
ALTER TABLE priced_events ADD COLUMN IF NOT EXISTS web_searches UInt64 DEFAULT 0 AFTER output_image_tokens;
-- @distributed cityHash64(tenant_id)
ALTER TABLE priced_events ADD COLUMN IF NOT EXISTS service_tier LowCardinality(String) DEFAULT '' AFTER web_searches;
-- @distributed cityHash64(tenant_id)
ALTER TABLE priced_events ADD COLUMN IF NOT EXISTS batch Bool DEFAULT false AFTER service_tier;
-- @distributed cityHash64(tenant_id)
ALTER TABLE priced_events ADD COLUMN IF NOT EXISTS cache_write_1h_cost_usd Decimal(38, 18) DEFAULT 0 AFTER cache_write_cost_usd;
-- @distributed cityHash64(tenant_id)
ALTER TABLE priced_events ADD COLUMN IF NOT EXISTS input_audio_cost_usd Decimal(38, 18) DEFAULT 0 AFTER cache_write_1h_cost_usd;
-- @distributed cityHash64(tenant_id)
ALTER TABLE priced_events ADD COLUMN IF NOT EXISTS input_image_cost_usd Decimal(38, 18) DEFAULT 0 AFTER input_audio_cost_usd;
-- @distributed cityHash64(tenant_id)
ALTER TABLE priced_events ADD COLUMN IF NOT EXISTS output_audio_cost_usd Decimal(38, 18) DEFAULT 0 AFTER input_image_cost_usd;
-- @distributed cityHash64(tenant_id)
ALTER TABLE priced_events ADD COLUMN IF NOT EXISTS output_image_cost_usd Decimal(38, 18) DEFAULT 0 AFTER output_audio_cost_usd;
-- @distributed cityHash64(tenant_id)
ALTER TABLE priced_events ADD COLUMN IF NOT EXISTS web_search_cost_usd Decimal(38, 18) DEFAULT 0 AFTER output_image_cost_usd;
