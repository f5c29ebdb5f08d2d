-- The seed's third table: mean inference and total time by engine and web framework. Rows the
-- worker pulled from Pub/Sub have no web framework and show as 'pull (none)'.
-- Parameters: @run_id STRING (NULL = every run), @run_prefix STRING (NULL = every run).
-- Columns: engine, precision, web_framework, images, mean_inference_ms, mean_total_ms,
--   mean_end_to_end_ms.
WITH selected AS (
  SELECT * REPLACE (COALESCE(web_framework, 'pull (none)') AS web_framework)
  FROM `${project}.${dataset}.results_dedup`
  WHERE (@run_id IS NULL OR run_id = @run_id)
    AND (@run_prefix IS NULL OR STARTS_WITH(run_id, @run_prefix))
)
SELECT
  engine,
  precision,
  web_framework,
  COUNT(*) AS images,
  AVG(inference_ms) AS mean_inference_ms,
  AVG(total_ms) AS mean_total_ms,
  AVG(end_to_end_ms) AS mean_end_to_end_ms
FROM selected
GROUP BY engine, precision, web_framework
ORDER BY engine, precision, web_framework
