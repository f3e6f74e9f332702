-- A cgroup's CPU limit in cores (ComputeSample.cpu_limit_cores: cpu.max quota / period), NULL without one: what a
-- container reserved, against which the stream flags idle reserved CPU (the idle_cpu anomaly).
-- @distributed cityHash64(tenant_id)
ALTER TABLE compute_samples ADD COLUMN IF NOT EXISTS cpu_limit_cores Nullable(Decimal(38, 18)) AFTER memory_byte_seconds;
