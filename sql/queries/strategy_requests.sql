-- `meterline simulate strategies --from-ledger`: requests per agent, priority and minute (allocator/strategies.py).
SELECT tenant_id, agent_id, priority, toStartOfMinute(ts) AS minute, count() AS requests
FROM priced_events
WHERE ts >= {since:DateTime64(3, 'UTC')} AND ts < {until:DateTime64(3, 'UTC')} AND priority != 'batch'
GROUP BY tenant_id, agent_id, priority, minute
ORDER BY minute, tenant_id, agent_id, priority
