-- Where the time goes, per engine: the mean of every stage of a row, in the order an image meets
-- them, with the sink (the results insert) joined from the batches table on batch_id. The worker's
-- stages queue + download + preprocess + batch_wait + batch_inference add up to total_ms; the rest
-- is unaccounted_ms, and rows_off_5pct counts rows whose stages miss their total by more than 5%.
-- Parameters: @run_id STRING (NULL = every run), @run_prefix STRING (NULL = every run).
-- Columns: engine, precision, images, mean_created_to_function_ms, mean_function_to_worker_ms,
--   mean_queue_ms, mean_download_ms, mean_preprocess_ms, mean_batch_wait_ms,
--   mean_batch_inference_ms, mean_unaccounted_ms, mean_total_ms, mean_sink_ms, mean_end_to_end_ms,
--   mean_inference_ms (per-image share of the batch call), rows_off_5pct, rows_without_batch.
WITH selected AS (
  SELECT *
  FROM `${project}.${dataset}.results_dedup`
  WHERE (@run_id IS NULL OR run_id = @run_id)
    AND (@run_prefix IS NULL OR STARTS_WITH(run_id, @run_prefix))
),
-- One row per batch: insertId de-duplication is best effort, so a retried insert can repeat one.
batch_sinks AS (
  SELECT batch_id, MAX(sink_ms) AS sink_ms
  FROM `${project}.${dataset}.batches`
  GROUP BY batch_id
),
staged AS (
  SELECT
    selected.*,
    batch_sinks.batch_id IS NOT NULL AS has_batch,
    batch_sinks.sink_ms,
    IFNULL(queue_ms, 0) + IFNULL(download_ms, 0) + IFNULL(preprocess_ms, 0) + IFNULL(batch_wait_ms, 0)
      + IFNULL(batch_inference_ms, 0) AS stages_ms
  FROM selected
  LEFT JOIN batch_sinks USING (batch_id)
)
SELECT
  engine,
  precision,
  COUNT(*) AS images,
  AVG(created_to_function_ms) AS mean_created_to_function_ms,
  AVG(function_to_worker_ms) AS mean_function_to_worker_ms,
  AVG(queue_ms) AS mean_queue_ms,
  AVG(download_ms) AS mean_download_ms,
  AVG(preprocess_ms) AS mean_preprocess_ms,
  AVG(batch_wait_ms) AS mean_batch_wait_ms,
  AVG(batch_inference_ms) AS mean_batch_inference_ms,
  AVG(total_ms - stages_ms) AS mean_unaccounted_ms,
  AVG(total_ms) AS mean_total_ms,
  AVG(sink_ms) AS mean_sink_ms,
  AVG(end_to_end_ms) AS mean_end_to_end_ms,
  AVG(inference_ms) AS mean_inference_ms,
  COUNTIF(ABS(total_ms - stages_ms) > 0.05 * total_ms) AS rows_off_5pct,
  COUNTIF(NOT has_batch) AS rows_without_batch
FROM staged
GROUP BY engine, precision
ORDER BY engine, precision
