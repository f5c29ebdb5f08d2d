-- Throughput over time per run and engine: images whose row was built in each time bucket of
-- @bucket_s seconds (60 = TIMESTAMP_TRUNC(processed_at, MINUTE); 1 for short local runs). Buckets
-- without rows are absent.
-- Parameters: @run_id STRING (NULL = every run), @run_prefix STRING (NULL = every run),
--   @bucket_s INT64 (bucket width in seconds, > 0; NULL = 60).
-- Columns: run_id, engine, precision, bucket_start, seconds_from_first (bucket_start minus the
--   first bucket of the same run and engine), images, images_per_s, images_per_minute.
WITH selected AS (
  SELECT *
  FROM `${project}.${dataset}.results_dedup`
  WHERE (@run_id IS NULL OR run_id = @run_id)
    AND (@run_prefix IS NULL OR STARTS_WITH(run_id, @run_prefix))
),
buckets AS (
  SELECT
    run_id,
    engine,
    precision,
    TIMESTAMP_SECONDS(DIV(UNIX_SECONDS(processed_at), COALESCE(@bucket_s, 60)) * COALESCE(@bucket_s, 60))
      AS bucket_start,
    COUNT(*) AS images
  FROM selected
  GROUP BY run_id, engine, precision, bucket_start
)
SELECT
  run_id,
  engine,
  precision,
  bucket_start,
  UNIX_SECONDS(bucket_start)
    - MIN(UNIX_SECONDS(bucket_start)) OVER (PARTITION BY run_id, engine, precision) AS seconds_from_first,
  images,
  images / COALESCE(@bucket_s, 60) AS images_per_s,
  images * 60 / COALESCE(@bucket_s, 60) AS images_per_minute
FROM buckets
ORDER BY run_id, engine, precision, bucket_start
