-- One row per run: what ran, how many images became result and error rows, how fast, and how
-- long images took. Runs with only error rows are listed too; rows without a run id show as
-- '(none)'.
-- Parameters: @run_id STRING (NULL = every run), @run_prefix STRING (NULL = every run).
-- Columns: run_id, engines ('engine/precision', comma-separated), images, errors,
--   first_received_at, last_processed_at, images_per_s (first receipt -> last row),
--   mean_batch_size, mean_inference_ms, p50_total_ms, p95_end_to_end_ms.
WITH selected AS (
  SELECT * REPLACE (IFNULL(run_id, '(none)') AS run_id)
  FROM `${project}.${dataset}.results_dedup`
  WHERE (@run_id IS NULL OR run_id = @run_id)
    AND (@run_prefix IS NULL OR STARTS_WITH(run_id, @run_prefix))
),
selected_errors AS (
  SELECT * REPLACE (IFNULL(run_id, '(none)') AS run_id)
  FROM `${project}.${dataset}.errors_dedup`
  WHERE (@run_id IS NULL OR run_id = @run_id)
    AND (@run_prefix IS NULL OR STARTS_WITH(run_id, @run_prefix))
),
run_results AS (
  SELECT
    run_id,
    STRING_AGG(DISTINCT CONCAT(engine, '/', IFNULL(precision, '-')), ', '
               ORDER BY CONCAT(engine, '/', IFNULL(precision, '-'))) AS engines,
    COUNT(*) AS images,
    MIN(received_at) AS first_received_at,
    MAX(processed_at) AS last_processed_at,
    SAFE_DIVIDE(COUNT(*), TIMESTAMP_DIFF(MAX(processed_at), MIN(received_at), MILLISECOND) / 1000)
      AS images_per_s,
    AVG(batch_size) AS mean_batch_size,
    AVG(inference_ms) AS mean_inference_ms,
    APPROX_QUANTILES(total_ms, 100)[SAFE_OFFSET(50)] AS p50_total_ms,
    APPROX_QUANTILES(end_to_end_ms, 100)[SAFE_OFFSET(95)] AS p95_end_to_end_ms
  FROM selected
  GROUP BY run_id
),
run_errors AS (
  SELECT run_id, COUNT(*) AS errors
  FROM selected_errors
  GROUP BY run_id
)
SELECT
  run_id,
  engines,
  IFNULL(images, 0) AS images,
  IFNULL(errors, 0) AS errors,
  first_received_at,
  last_processed_at,
  images_per_s,
  mean_batch_size,
  mean_inference_ms,
  p50_total_ms,
  p95_end_to_end_ms
FROM run_results
FULL OUTER JOIN run_errors USING (run_id)
ORDER BY first_received_at, run_id
