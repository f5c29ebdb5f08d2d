-- Per label for one run: images, mean score, and inference / total time in ms.
-- @run_id: the run to summarise (NULL = every row).
SELECT
  label,
  COUNT(*) AS images,
  ROUND(AVG(score), 3) AS mean_score,
  ROUND(AVG(inference_ms), 3) AS mean_inference_ms,
  ROUND(APPROX_QUANTILES(inference_ms, 100)[OFFSET(50)], 3) AS p50_inference_ms,
  ROUND(APPROX_QUANTILES(inference_ms, 100)[OFFSET(95)], 3) AS p95_inference_ms,
  ROUND(AVG(total_ms), 1) AS mean_total_ms,
  ROUND(APPROX_QUANTILES(total_ms, 100)[OFFSET(50)], 1) AS p50_total_ms,
  ROUND(APPROX_QUANTILES(total_ms, 100)[OFFSET(95)], 1) AS p95_total_ms
FROM `${project}.${dataset}.results_dedup`
WHERE @run_id IS NULL OR run_id = @run_id
GROUP BY label
ORDER BY label
