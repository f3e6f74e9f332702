-- Measured figures per model of one budget scope's LLM calls in [since, until), for the SLO-aware downgrade
-- (allocator/slo.py): calls, calls with status ok, calls that reported a latency (latency_ms > 0), the
-- nearest-rank p95 of those latencies (the ceil(0.95 n)-th smallest, exact; 0 when none), and their cost;
-- the ROLLUP row (model '') is the scope's whole, what `meterline report slo` measures attainment on.
-- Parameters: tenant, team, project, agent, session String; depth UInt8 (0 tenant ... 4 session); since/until DateTime64(3).
SELECT toString(model) AS model,
       count() AS calls,
       countIf(status = 'ok') AS ok_calls,
       countIf(latency_ms > 0) AS latency_calls,
       if(latency_calls = 0, 0,
          arrayElement(arraySort(groupArrayIf(latency_ms, latency_ms > 0)), toUInt64(ceil(0.95 * latency_calls)))) AS p95_latency_ms,
       sum(cost_usd) AS cost_usd
FROM priced_events
WHERE kind = 'llm_call' AND ts >= {since:DateTime64(3, 'UTC')} AND ts < {until:DateTime64(3, 'UTC')}
  AND tenant_id = {tenant:String}
  AND ({depth:UInt8} < 1 OR team = {team:String})
  AND ({depth:UInt8} < 2 OR project = {project:String})
  AND ({depth:UInt8} < 3 OR agent_id = {agent:String})
  AND ({depth:UInt8} < 4 OR session_id = {session:String})
GROUP BY model WITH ROLLUP
ORDER BY model
