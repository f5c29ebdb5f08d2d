-- Latency distributions per engine for plots: 101 percentiles (0, 1, ..., 100) of the per-image
-- inference time, the total time and the end-to-end time, so the report draws distributions
-- without reading every row.
-- Parameters: @run_id STRING (NULL = every run), @run_prefix STRING (NULL = every run).
-- Columns: engine, precision, images, inference_ms_percentiles, total_ms_percentiles,
--   end_to_end_ms_percentiles (ARRAY<FLOAT64>, index = percentile; NULL when no row has the value).
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
  APPROX_QUANTILES(inference_ms, 100) AS inference_ms_percentiles,
  APPROX_QUANTILES(total_ms, 100) AS total_ms_percentiles,
  APPROX_QUANTILES(end_to_end_ms, 100) AS end_to_end_ms_percentiles
FROM selected
GROUP BY engine, precision
ORDER BY engine, precision
