-- The Kubernetes pod a GPU process row stands for (GpuSample.namespace/pod/container): rows from
-- `meterline collect dcgm` (the DCGM exporter reports pods, not pids); empty for NVML rows.
-- @distributed cityHash64(tenant_id)
ALTER TABLE gpu_samples ADD COLUMN IF NOT EXISTS namespace LowCardinality(String) DEFAULT '' AFTER simulated,
    ADD COLUMN IF NOT EXISTS pod String DEFAULT '' AFTER namespace,
    ADD COLUMN IF NOT EXISTS container LowCardinality(String) DEFAULT '' AFTER pod;
