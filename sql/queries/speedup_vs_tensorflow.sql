-- Speed-up against the TensorFlow baseline: TensorFlow's mean and p50 per-image inference and
-- total time divided by each engine's, over the same rows (same run filter). Above 1 = faster
-- than TensorFlow; NULL when the selection has no TensorFlow rows.
-- Parameters: @run_id STRING (NULL = every run), @run_prefix STRING (NULL = every run).
-- Columns: engine, precision, images, mean_inference_ms, p50_inference_ms, mean_total_ms,
--   p50_total_ms, tensorflow_images, speedup_mean_inference, speedup_p50_inference,
--   speedup_mean_total, speedup_p50_total.
WITH selected AS (
  SELECT *
  FROM `${project}.${dataset}.results_dedup`
  WHERE (@run_id IS NULL OR run_id = @run_id)
    AND (@run_prefix IS NULL OR STARTS_WITH(run_id, @run_prefix))
),
baseline AS (
  SELECT
    COUNT(*) AS tensorflow_images,
    AVG(inference_ms) AS mean_inference_ms,
    APPROX_QUANTILES(inference_ms, 100)[SAFE_OFFSET(50)] AS p50_inference_ms,
    AVG(total_ms) AS mean_total_ms,
    APPROX_QUANTILES(total_ms, 100)[SAFE_OFFSET(50)] AS p50_total_ms
  FROM selected
  WHERE engine = 'tensorflow'
),
per_engine AS (
  SELECT
    engine,
    precision,
    COUNT(*) AS images,
    AVG(inference_ms) AS mean_inference_ms,
    APPROX_QUANTILES(inference_ms, 100)[SAFE_OFFSET(50)] AS p50_inference_ms,
    AVG(total_ms) AS mean_total_ms,
    APPROX_QUANTILES(total_ms, 100)[SAFE_OFFSET(50)] AS p50_total_ms
  FROM selected
  GROUP BY engine, precision
)
SELECT
  per_engine.engine,
  per_engine.precision,
  per_engine.images,
  per_engine.mean_inference_ms,
  per_engine.p50_inference_ms,
  per_engine.mean_total_ms,
  per_engine.p50_total_ms,
  baseline.tensorflow_images,
  SAFE_DIVIDE(baseline.mean_inference_ms, per_engine.mean_inference_ms) AS speedup_mean_inference,
  SAFE_DIVIDE(baseline.p50_inference_ms, per_engine.p50_inference_ms) AS speedup_p50_inference,
  SAFE_DIVIDE(baseline.mean_total_ms, per_engine.mean_total_ms) AS speedup_mean_total,
  SAFE_DIVIDE(baseline.p50_total_ms, per_engine.p50_total_ms) AS speedup_p50_total
FROM per_engine
CROSS JOIN baseline
ORDER BY per_engine.engine, per_engine.precision
