-- CPU time in the stream's spend snapshots (SpendUpdate.cpu_seconds): the CPU-seconds of `collect node` samples a
-- scope used this period, which a vCPU-hour budget counts (BudgetPolicy.unit = 'vcpu_hours'), as gpu_seconds does
-- for GPU-hour budgets. 0 for snapshots written before it.
-- @distributed cityHash64(tenant_id)
ALTER TABLE spend_updates ADD COLUMN IF NOT EXISTS cpu_seconds Decimal(38, 18) DEFAULT 0 AFTER unpriced_events;
