-- The model dimension: per network (model_name), engine and precision, with the CPU's ISA flags
-- (migration 003), so figures from machines that differ in AVX-512/VNNI/bf16 are not averaged
-- together. `make bench-models --stack-models ...` writes such rows for the zoo's networks.
-- Parameters: @run_id STRING (NULL = every run), @run_prefix STRING (NULL = every run).
-- Columns: model_name, engine, precision, cpu_flags, images, mean_batch_size, mean_inference_ms,
--   p50_inference_ms, p95_inference_ms (per-image share of the batch call), mean_total_ms,
--   images_per_s (rows over the span from the first receipt to the last row, per run, summed).
WITH selected AS (
  SELECT *,
    -- One string per group: equal keys join even where cpu_flags is NULL (rows before migration 003).
    CONCAT(COALESCE(model_name, ''), '|', engine, '|', precision, '|', COALESCE(cpu_flags, '')) AS group_key
  FROM `${project}.${dataset}.results_dedup`
  WHERE (@run_id IS NULL OR run_id = @run_id)
    AND (@run_prefix IS NULL OR STARTS_WITH(run_id, @run_prefix))
),
per_run AS (
  SELECT group_key, run_id, COUNT(*) AS images,
    TIMESTAMP_DIFF(MAX(processed_at), MIN(received_at), MILLISECOND) AS span_ms
  FROM selected
  GROUP BY group_key, run_id
),
rates AS (
  SELECT group_key, SUM(images) / NULLIF(SUM(span_ms) / 1000.0, 0) AS images_per_s
  FROM per_run
  GROUP BY group_key
)
SELECT
  model_name,
  engine,
  precision,
  cpu_flags,
  COUNT(*) AS images,
  AVG(batch_size) AS mean_batch_size,
  AVG(inference_ms) AS mean_inference_ms,
  APPROX_QUANTILES(inference_ms, 100)[SAFE_OFFSET(50)] AS p50_inference_ms,
  APPROX_QUANTILES(inference_ms, 100)[SAFE_OFFSET(95)] AS p95_inference_ms,
  AVG(total_ms) AS mean_total_ms,
  ANY_VALUE(images_per_s) AS images_per_s
FROM selected
LEFT JOIN rates USING (group_key)
GROUP BY model_name, engine, precision, cpu_flags
ORDER BY model_name, engine, precision, cpu_flags
