-- attributed_spend(since, until): every attributed cost row in [since, until) on one grain, the block that
-- scope_spend, top_sessions and cost_per_action share: priced usage ('usage'), process-level GPU time that a
-- session owns ('gpu') and CPU and memory a session owns ('compute', `collect node`). Unattributed GPU or CPU
-- time is not here (chargeback adds it to the tenant 'unattributed'). A parameterized view, so users can
-- select from it too: SELECT tenant_id, sum(usage_cost + gpu_cost + compute_cost)
--   FROM attributed_spend(since = '2026-11-01 00:00:00', until = '2026-12-01 00:00:00') GROUP BY tenant_id
CREATE VIEW IF NOT EXISTS attributed_spend AS
SELECT 'usage' AS source, ts, tenant_id, team, project, agent_id, session_id, status = 'ok' AS ok,
       cost_usd AS usage_cost, toDecimal128(0, 18) AS gpu_cost, toDecimal128(0, 18) AS compute_cost,
       toDecimal128(0, 18) AS gpu_seconds, toDecimal128(0, 18) AS cpu_seconds
FROM priced_events
WHERE ts >= {since:DateTime64(3, 'UTC')} AND ts < {until:DateTime64(3, 'UTC')}
UNION ALL
SELECT 'gpu', ts, tenant_id, team, project, agent_id, session_id, false, toDecimal128(0, 18), cost_usd, toDecimal128(0, 18),
       gpu_seconds, toDecimal128(0, 18)
FROM gpu_samples
WHERE level = 'process' AND attributed AND ts >= {since:DateTime64(3, 'UTC')} AND ts < {until:DateTime64(3, 'UTC')}
UNION ALL
SELECT 'compute', ts, tenant_id, team, project, agent_id, session_id, false, toDecimal128(0, 18), toDecimal128(0, 18),
       cpu_cost_usd + memory_cost_usd, toDecimal128(0, 18), cpu_user_seconds + cpu_system_seconds
FROM compute_samples
WHERE attributed AND ts >= {since:DateTime64(3, 'UTC')} AND ts < {until:DateTime64(3, 'UTC')};
