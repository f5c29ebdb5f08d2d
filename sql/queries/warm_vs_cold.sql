-- Warm against cold per engine: rows from a worker's first batch (cold = TRUE, model just loaded)
-- next to the rest, and how many times slower the cold ones were.
-- Parameters: @run_id STRING (NULL = every run), @run_prefix STRING (NULL = every run).
-- Columns: engine, precision, cold_images, warm_images, cold_mean_inference_ms,
--   warm_mean_inference_ms, cold_mean_total_ms, warm_mean_total_ms, cold_over_warm_inference,
--   cold_over_warm_total (NULL when either side has no rows).
WITH selected AS (
  SELECT *
  FROM `${project}.${dataset}.results_dedup`
  WHERE (@run_id IS NULL OR run_id = @run_id)
    AND (@run_prefix IS NULL OR STARTS_WITH(run_id, @run_prefix))
),
split AS (
  SELECT
    engine,
    precision,
    COUNTIF(cold) AS cold_images,
    COUNTIF(NOT cold) AS warm_images,
    AVG(IF(cold, inference_ms, NULL)) AS cold_mean_inference_ms,
    AVG(IF(NOT cold, inference_ms, NULL)) AS warm_mean_inference_ms,
    AVG(IF(cold, total_ms, NULL)) AS cold_mean_total_ms,
    AVG(IF(NOT cold, total_ms, NULL)) AS warm_mean_total_ms
  FROM selected
  GROUP BY engine, precision
)
SELECT
  engine,
  precision,
  cold_images,
  warm_images,
  cold_mean_inference_ms,
  warm_mean_inference_ms,
  cold_mean_total_ms,
  warm_mean_total_ms,
  SAFE_DIVIDE(cold_mean_inference_ms, warm_mean_inference_ms) AS cold_over_warm_inference,
  SAFE_DIVIDE(cold_mean_total_ms, warm_mean_total_ms) AS cold_over_warm_total
FROM split
ORDER BY engine, precision
