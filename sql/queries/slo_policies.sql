-- The current version of every budget policy that has an SLO (migration 0014), deleted ones left out.
-- Parameters: tenant String ('' = all).
SELECT policy_id, tenant_id, scope, scope_id, slo_p95_latency_ms, slo_success_rate_pct, slo_cost_per_success_usd, slo_min_calls
FROM
(
    SELECT policy_id,
           argMax(tenant_id, (created_at, _ingested_at)) AS tenant_id,
           argMax(scope, (created_at, _ingested_at)) AS scope,
           argMax(scope_id, (created_at, _ingested_at)) AS scope_id,
           argMax(slo_p95_latency_ms, (created_at, _ingested_at)) AS slo_p95_latency_ms,
           argMax(slo_success_rate_pct, (created_at, _ingested_at)) AS slo_success_rate_pct,
           argMax(slo_cost_per_success_usd, (created_at, _ingested_at)) AS slo_cost_per_success_usd,
           argMax(slo_min_calls, (created_at, _ingested_at)) AS slo_min_calls,
           argMax(deleted, (created_at, _ingested_at)) AS deleted
    FROM budget_policies
    GROUP BY policy_id
)
WHERE NOT deleted AND ({tenant:String} = '' OR tenant_id = {tenant:String})
  AND (slo_p95_latency_ms IS NOT NULL OR slo_success_rate_pct IS NOT NULL OR slo_cost_per_success_usd IS NOT NULL)
ORDER BY tenant_id, scope, scope_id, policy_id
