-- /metrics (app/metrics.py): the latest recommended replicas per endpoint (ScaleRecommendation), newest by ts.
SELECT provider, model, argMax(recommended_replicas, (ts, _offset)) AS replicas
FROM scale_recommendations
GROUP BY endpoint, provider, model
ORDER BY provider, model
