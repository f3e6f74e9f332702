-- SLOs on budgets (BudgetPolicy.slo, issue 15 item 4), flattened: one nullable column per objective
-- (NULL = no such objective; all NULL = no SLO). `meterline report slo` reads the latest version.
-- @distributed cityHash64(tenant_id)
ALTER TABLE budget_policies ADD COLUMN IF NOT EXISTS slo_p95_latency_ms Nullable(UInt32) AFTER actions;
-- @distributed cityHash64(tenant_id)
ALTER TABLE budget_policies ADD COLUMN IF NOT EXISTS slo_success_rate_pct Nullable(Decimal(9, 6)) AFTER slo_p95_latency_ms;
-- @distributed cityHash64(tenant_id)
ALTER TABLE budget_policies ADD COLUMN IF NOT EXISTS slo_cost_per_success_usd Nullable(Decimal(38, 18)) AFTER slo_success_rate_pct;
-- @distributed cityHash64(tenant_id)
ALTER TABLE budget_policies ADD COLUMN IF NOT EXISTS slo_min_calls Nullable(UInt32) AFTER slo_cost_per_success_usd;

-- A downgrade decision names the model it stands in for, so the report can price what each downgrade saved.
-- @distributed cityHash64(tenant_id)
ALTER TABLE throttle_decisions ADD COLUMN IF NOT EXISTS downgraded_from Nullable(String) AFTER max_model;
