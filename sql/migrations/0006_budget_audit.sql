-- Who set or deleted each budget policy version: the `changed_by` header of its budgets-topic
-- record (an API token's name, or cli:<user> for `meterline budget`); '' for older records.
-- @distributed cityHash64(tenant_id)
ALTER TABLE budget_policies ADD COLUMN IF NOT EXISTS changed_by String DEFAULT '' AFTER deleted;
