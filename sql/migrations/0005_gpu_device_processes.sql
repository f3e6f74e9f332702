-- How many processes shared a GPU or MIG slice in a sample (GpuSample.device_processes): a
-- process row's gpu_seconds and cost_usd are already its 1/n share; this says what n was.
-- @distributed cityHash64(tenant_id)
ALTER TABLE gpu_samples ADD COLUMN IF NOT EXISTS device_processes UInt32 DEFAULT 1 AFTER sm_util_pct;
