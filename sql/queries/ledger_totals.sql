-- Grand totals of the ledger in [since, until): the number every chargeback must add up to.
-- Parameters: since/until DateTime64(3).
SELECT
    (SELECT count() FROM priced_events WHERE ts >= {since:DateTime64(3, 'UTC')} AND ts < {until:DateTime64(3, 'UTC')}) AS priced_events,
    (SELECT sum(cost_usd) FROM priced_events WHERE ts >= {since:DateTime64(3, 'UTC')} AND ts < {until:DateTime64(3, 'UTC')}) AS usage_cost_usd,
    (SELECT countIf(cost_source = 'unpriced') FROM priced_events WHERE ts >= {since:DateTime64(3, 'UTC')} AND ts < {until:DateTime64(3, 'UTC')}) AS unpriced_events,
    (SELECT sum(cost_usd) FROM gpu_samples WHERE level = 'process' AND ts >= {since:DateTime64(3, 'UTC')} AND ts < {until:DateTime64(3, 'UTC')}) AS gpu_cost_usd,
    (SELECT sum(cpu_cost_usd) FROM compute_samples WHERE ts >= {since:DateTime64(3, 'UTC')} AND ts < {until:DateTime64(3, 'UTC')}) AS cpu_cost_usd,
    (SELECT sum(memory_cost_usd) FROM compute_samples WHERE ts >= {since:DateTime64(3, 'UTC')} AND ts < {until:DateTime64(3, 'UTC')}) AS memory_cost_usd,
    (SELECT count() FROM throttle_decisions WHERE issued_at >= {since:DateTime64(3, 'UTC')} AND issued_at < {until:DateTime64(3, 'UTC')}) AS decisions,
    (SELECT count() FROM anomalies WHERE ts >= {since:DateTime64(3, 'UTC')} AND ts < {until:DateTime64(3, 'UTC')}) AS anomalies
