-- `meterline plan gpu` (allocator/plan.py): busy GPU-seconds per pool (node class + GPU model), tenant, session
-- and minute, from process rows; the session's priority from its priced events ('' when it has none). A node
-- class is the node name without its trailing number (gpu-node-3 -> gpu-node). MIG rows keep their profile.
SELECT replaceRegexpOne(g.node, '[-_.]?[0-9]+$', '') AS node_class, g.gpu_name AS gpu_name, g.tenant_id AS tenant_id,
       g.session_id AS session_id, any(p.priority) AS priority, g.mig_profile AS mig_profile,
       max(g.mig_slices) AS mig_slices, max(g.mig_total_slices) AS mig_total_slices,
       toStartOfMinute(g.ts) AS minute, sum(g.gpu_seconds) AS gpu_seconds
FROM gpu_samples AS g
LEFT JOIN (SELECT tenant_id, session_id, any(priority) AS priority FROM priced_events
           WHERE ts >= {since:DateTime64(3, 'UTC')} AND ts < {until:DateTime64(3, 'UTC')} AND session_id != ''
           GROUP BY tenant_id, session_id) AS p
  ON g.tenant_id = p.tenant_id AND g.session_id = p.session_id
WHERE g.level = 'process' AND g.ts >= {since:DateTime64(3, 'UTC')} AND g.ts < {until:DateTime64(3, 'UTC')}
GROUP BY node_class, gpu_name, tenant_id, session_id, mig_profile, minute
ORDER BY minute, node_class, gpu_name, tenant_id, session_id, mig_profile
