-- The seed's second table: mean inference and total time by engine and machine size. A machine
-- size is its environment (local, cloud), logical cores and memory rounded to 0.1 GiB.
-- Parameters: @run_id STRING (NULL = every run), @run_prefix STRING (NULL = every run).
-- Columns: engine, precision, environment, logical_cores, memory_gib, hosts (distinct workers),
--   cpu_models, images, mean_inference_ms, mean_total_ms, mean_end_to_end_ms.
WITH selected AS (
  SELECT *, ROUND(memory_total_bytes / 1073741824, 1) AS memory_gib
  FROM `${project}.${dataset}.results_dedup`
  WHERE (@run_id IS NULL OR run_id = @run_id)
    AND (@run_prefix IS NULL OR STARTS_WITH(run_id, @run_prefix))
)
SELECT
  engine,
  precision,
  environment,
  logical_cores,
  memory_gib,
  COUNT(DISTINCT worker_host) AS hosts,
  STRING_AGG(DISTINCT cpu_model, ', ' ORDER BY cpu_model) AS cpu_models,
  COUNT(*) AS images,
  AVG(inference_ms) AS mean_inference_ms,
  AVG(total_ms) AS mean_total_ms,
  AVG(end_to_end_ms) AS mean_end_to_end_ms
FROM selected
GROUP BY engine, precision, environment, logical_cores, memory_gib
ORDER BY engine, precision, environment, logical_cores, memory_gib
