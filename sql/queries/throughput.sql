-- Throughput per engine while it ran: images per second and per minute over the busy time (each
-- run's first receipt -> last row built, summed over runs, so idle time between runs does not
-- count), and the busiest minute and second (TIMESTAMP_TRUNC of processed_at) of any run.
-- Parameters: @run_id STRING (NULL = every run), @run_prefix STRING (NULL = every run).
-- Columns: engine, precision, runs, images, first_received_at, last_processed_at, busy_s,
--   longest_run_s, images_per_s, images_per_minute, peak_images_per_minute, peak_images_per_second.
WITH selected AS (
  SELECT *
  FROM `${project}.${dataset}.results_dedup`
  WHERE (@run_id IS NULL OR run_id = @run_id)
    AND (@run_prefix IS NULL OR STARTS_WITH(run_id, @run_prefix))
),
per_second AS (
  SELECT
    run_id,
    engine,
    precision,
    TIMESTAMP_TRUNC(processed_at, MINUTE) AS minute_start,
    TIMESTAMP_TRUNC(processed_at, SECOND) AS second_start,
    COUNT(*) AS images,
    MIN(received_at) AS first_received_at,
    MAX(processed_at) AS last_processed_at
  FROM selected
  GROUP BY run_id, engine, precision, minute_start, second_start
),
per_minute AS (
  SELECT
    run_id,
    engine,
    precision,
    minute_start,
    SUM(images) AS images,
    MAX(images) AS peak_images_per_second,
    MIN(first_received_at) AS first_received_at,
    MAX(last_processed_at) AS last_processed_at
  FROM per_second
  GROUP BY run_id, engine, precision, minute_start
),
per_run AS (
  SELECT
    run_id,
    engine,
    precision,
    SUM(images) AS images,
    MIN(first_received_at) AS first_received_at,
    MAX(last_processed_at) AS last_processed_at,
    TIMESTAMP_DIFF(MAX(last_processed_at), MIN(first_received_at), MILLISECOND) / 1000 AS span_s,
    MAX(images) AS peak_images_per_minute,
    MAX(peak_images_per_second) AS peak_images_per_second
  FROM per_minute
  GROUP BY run_id, engine, precision
)
SELECT
  engine,
  precision,
  COUNT(*) AS runs,
  SUM(images) AS images,
  MIN(first_received_at) AS first_received_at,
  MAX(last_processed_at) AS last_processed_at,
  SUM(span_s) AS busy_s,
  MAX(span_s) AS longest_run_s,
  SAFE_DIVIDE(SUM(images), SUM(span_s)) AS images_per_s,
  SAFE_DIVIDE(SUM(images) * 60, SUM(span_s)) AS images_per_minute,
  MAX(peak_images_per_minute) AS peak_images_per_minute,
  MAX(peak_images_per_second) AS peak_images_per_second
FROM per_run
GROUP BY engine, precision
ORDER BY engine, precision
