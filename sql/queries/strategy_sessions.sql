-- `meterline simulate strategies --from-ledger`: GPU-seconds per session (process rows) with the session's
-- agent and priority from its priced events; a session without events takes its agent's most common
-- priority (a GPU collector's session ids need not be the SDK's), '' when the agent has none either.
-- GPU time no session owns is one job per hour.
SELECT g.tenant_id AS tenant_id, if(p.agent_id != '', p.agent_id, any(g.agent_id)) AS agent_id,
       if(g.session_id = '', concat('unattributed@', toString(toStartOfHour(g.ts))), g.session_id) AS job,
       if(p.priority != '', p.priority, any(a.priority)) AS priority, min(g.ts) AS first_ts, sum(g.gpu_seconds) AS gpu_seconds
FROM gpu_samples AS g
LEFT JOIN (SELECT tenant_id, session_id, any(agent_id) AS agent_id, any(priority) AS priority FROM priced_events
           WHERE ts >= {since:DateTime64(3, 'UTC')} AND ts < {until:DateTime64(3, 'UTC')} AND session_id != ''
           GROUP BY tenant_id, session_id) AS p
  ON g.tenant_id = p.tenant_id AND g.session_id = p.session_id
LEFT JOIN (SELECT tenant_id, agent_id, argMax(priority, (n, priority)) AS priority
           FROM (SELECT tenant_id, agent_id, priority, count() AS n FROM priced_events
                 WHERE ts >= {since:DateTime64(3, 'UTC')} AND ts < {until:DateTime64(3, 'UTC')} AND agent_id != ''
                 GROUP BY tenant_id, agent_id, priority)
           GROUP BY tenant_id, agent_id) AS a
  ON g.tenant_id = a.tenant_id AND g.agent_id = a.agent_id
WHERE g.level = 'process' AND g.ts >= {since:DateTime64(3, 'UTC')} AND g.ts < {until:DateTime64(3, 'UTC')}
GROUP BY tenant_id, job, p.agent_id, p.priority
ORDER BY first_ts, tenant_id, job
