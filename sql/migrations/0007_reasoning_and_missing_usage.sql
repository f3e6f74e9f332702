-- Reasoning (thinking) tokens, a subset of output_tokens (billed as output, reported apart), and
-- whether the call's instrumentation reported its usage at all ('missing': its zero tokens are unknown).
-- @distributed cityHash64(tenant_id)
ALTER TABLE priced_events ADD COLUMN IF NOT EXISTS reasoning_tokens UInt64 DEFAULT 0 AFTER cache_write_tokens;
-- @distributed cityHash64(tenant_id)
ALTER TABLE priced_events ADD COLUMN IF NOT EXISTS usage LowCardinality(String) DEFAULT 'reported' AFTER reasoning_tokens;
