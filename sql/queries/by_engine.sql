-- The seed's first table: mean inference and total time per image by engine (and the precision
-- that really ran, so OpenVINO f32 and bf16 are not averaged together).
-- Parameters: @run_id STRING (NULL = every run), @run_prefix STRING (NULL = every run).
-- Columns: engine, precision, images, mean_batch_size (images per engine call),
--   mean_inference_ms (per-image share of the batch call), mean_total_ms (worker receipt -> handed
--   to the sink), mean_end_to_end_ms (object created -> row built).
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
  AVG(batch_size) AS mean_batch_size,
  AVG(inference_ms) AS mean_inference_ms,
  AVG(total_ms) AS mean_total_ms,
  AVG(end_to_end_ms) AS mean_end_to_end_ms
FROM selected
GROUP BY engine, precision
ORDER BY engine, precision
