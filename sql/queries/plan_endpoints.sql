-- `meterline plan endpoints` (allocator/endpoints.py): per self-hosted model endpoint, its LLM calls in the window,
-- the mean latency of successful ones (its service time) and their p95, and the GPUs (devices or MIG slices)
-- whose process samples carry the calls' sessions, with their mean utilisation (the process's SM share if known).
SELECT e.provider AS provider, e.model AS model, e.requests AS requests, e.service_ms AS service_ms, e.p95_ms AS p95_ms,
       g.gpus AS gpus, g.gpu_util AS gpu_util
FROM (SELECT provider, model, count() AS requests, avgIf(latency_ms, status = 'ok') AS service_ms,
             quantileExactIf(0.95)(latency_ms, status = 'ok') AS p95_ms
      FROM priced_events
      WHERE ts >= {since:DateTime64(3, 'UTC')} AND ts < {until:DateTime64(3, 'UTC')} AND kind = 'llm_call'
        AND provider IN ('selfhosted', 'self-hosted')
      GROUP BY provider, model) AS e
LEFT JOIN (SELECT s.provider AS provider, s.model AS model, uniqExact(p.gpu_uuid, p.mig_uuid) AS gpus,
                  avg(coalesce(p.sm_util_pct, p.utilization_pct)) AS gpu_util
           FROM gpu_samples AS p
           INNER JOIN (SELECT DISTINCT tenant_id, session_id, provider, model FROM priced_events
                       WHERE ts >= {since:DateTime64(3, 'UTC')} AND ts < {until:DateTime64(3, 'UTC')} AND kind = 'llm_call'
                         AND provider IN ('selfhosted', 'self-hosted') AND session_id != '') AS s
             ON p.tenant_id = s.tenant_id AND p.session_id = s.session_id
           WHERE p.level = 'process' AND p.ts >= {since:DateTime64(3, 'UTC')} AND p.ts < {until:DateTime64(3, 'UTC')}
           GROUP BY s.provider, s.model) AS g
  ON e.provider = g.provider AND e.model = g.model
ORDER BY provider, model
