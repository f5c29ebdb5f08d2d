-- Per label for one run (the table `make demo` prints): images, mean score (each row's score is its own
-- label's, schema v2), and inference and total time in ms, rounded for the terminal.
-- Parameters: @run_id STRING (the run to summarise; NULL = every row).
-- Columns: label, images, mean_score, mean_inference_ms, p50/p95_inference_ms, mean_total_ms,
--   p50/p95_total_ms.
SELECT
  label,
  COUNT(*) AS images,
  ROUND(AVG(score), 3) AS mean_score,
  ROUND(AVG(inference_ms), 3) AS mean_inference_ms,
  ROUND(APPROX_QUANTILES(inference_ms, 100)[SAFE_OFFSET(50)], 3) AS p50_inference_ms,
  ROUND(APPROX_QUANTILES(inference_ms, 100)[SAFE_OFFSET(95)], 3) AS p95_inference_ms,
  ROUND(AVG(total_ms), 1) AS mean_total_ms,
  ROUND(APPROX_QUANTILES(total_ms, 100)[SAFE_OFFSET(50)], 1) AS p50_total_ms,
  ROUND(APPROX_QUANTILES(total_ms, 100)[SAFE_OFFSET(95)], 1) AS p95_total_ms
FROM `${project}.${dataset}.results_dedup`
WHERE @run_id IS NULL OR run_id = @run_id
GROUP BY label
ORDER BY label
