-- The current version of every budget policy (deleted ones left out).
-- Parameters: tenant String ('' = all).
SELECT policy_id, tenant_id, scope, scope_id, unit, amount, period, period_anchor, period_seconds, timezone, hard, latest_version_at AS created_at
FROM
(
    SELECT policy_id,
           argMax(tenant_id, (created_at, _ingested_at)) AS tenant_id,
           argMax(scope, (created_at, _ingested_at)) AS scope,
           argMax(scope_id, (created_at, _ingested_at)) AS scope_id,
           argMax(unit, (created_at, _ingested_at)) AS unit,
           argMax(amount, (created_at, _ingested_at)) AS amount,
           argMax(period, (created_at, _ingested_at)) AS period,
           argMax(period_anchor, (created_at, _ingested_at)) AS period_anchor,
           argMax(period_seconds, (created_at, _ingested_at)) AS period_seconds,
           argMax(timezone, (created_at, _ingested_at)) AS timezone,
           argMax(hard, (created_at, _ingested_at)) AS hard,
           argMax(deleted, (created_at, _ingested_at)) AS deleted,
           max(created_at) AS latest_version_at
    FROM budget_policies
    GROUP BY policy_id
)
WHERE NOT deleted AND ({tenant:String} = '' OR tenant_id = {tenant:String})
ORDER BY tenant_id, scope, scope_id, policy_id
