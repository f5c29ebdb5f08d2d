-- Latency percentiles per engine: p50, p95 and p99 of the per-image inference time, the worker's
-- total time and the end-to-end time (APPROX_QUANTILES with 100 buckets: exact nearest-rank
-- values for small runs, within about 1% of rank on large ones; SAFE_OFFSET gives NULL, not an
-- error, when every value is NULL).
-- Parameters: @run_id STRING (NULL = every run), @run_prefix STRING (NULL = every run).
-- Columns: engine, precision, images, p50/p95/p99_inference_ms, p50/p95/p99_total_ms,
--   p50/p95/p99_end_to_end_ms, max_total_ms.
WITH selected AS (
  SELECT *
  FROM `${project}.${dataset}.results_dedup`
  WHERE (@run_id IS NULL OR run_id = @run_id)
    AND (@run_prefix IS NULL OR STARTS_WITH(run_id, @run_prefix))
)
SELECT
  engine,
  precision,
  COUNT(*) AS images,
  APPROX_QUANTILES(inference_ms, 100)[SAFE_OFFSET(50)] AS p50_inference_ms,
  APPROX_QUANTILES(inference_ms, 100)[SAFE_OFFSET(95)] AS p95_inference_ms,
  APPROX_QUANTILES(inference_ms, 100)[SAFE_OFFSET(99)] AS p99_inference_ms,
  APPROX_QUANTILES(total_ms, 100)[SAFE_OFFSET(50)] AS p50_total_ms,
  APPROX_QUANTILES(total_ms, 100)[SAFE_OFFSET(95)] AS p95_total_ms,
  APPROX_QUANTILES(total_ms, 100)[SAFE_OFFSET(99)] AS p99_total_ms,
  APPROX_QUANTILES(end_to_end_ms, 100)[SAFE_OFFSET(50)] AS p50_end_to_end_ms,
  APPROX_QUANTILES(end_to_end_ms, 100)[SAFE_OFFSET(95)] AS p95_end_to_end_ms,
  APPROX_QUANTILES(end_to_end_ms, 100)[SAFE_OFFSET(99)] AS p99_end_to_end_ms,
  MAX(total_ms) AS max_total_ms
FROM selected
GROUP BY engine, precision
ORDER BY engine, precision
