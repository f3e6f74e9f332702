-- `report strategies` (the web page's card): the latest stored `simulate strategies --store` run, one row per strategy.
SELECT strategy, cost_usd, daily_cost_cv, critical_p99_wait_s, slo_s, slo_met_pct, utilisation_pct, batch_lost_pct,
       savings_vs_static_pct, deadline_misses, gpu_hours_paid, source, gpu, run_id, ts
FROM strategy_results
WHERE run_id = (SELECT argMax(run_id, ts) FROM strategy_results WHERE ts >= {since:DateTime64(3, 'UTC')} AND ts < {until:DateTime64(3, 'UTC')})
ORDER BY indexOf(['static', 'dynamic', 'priority', 'spot', 'meterline'], toString(strategy)), strategy
