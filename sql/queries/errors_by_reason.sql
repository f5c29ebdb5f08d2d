-- Error rows by reason code (one per upload, from errors_dedup), most frequent first.
-- Parameters: @run_id STRING (NULL = every run), @run_prefix STRING (NULL = every run).
-- Columns: reason, errors, runs (distinct run ids), first_failed_at, last_failed_at.
WITH selected_errors AS (
  SELECT *
  FROM `${project}.${dataset}.errors_dedup`
  WHERE (@run_id IS NULL OR run_id = @run_id)
    AND (@run_prefix IS NULL OR STARTS_WITH(run_id, @run_prefix))
)
SELECT
  reason,
  COUNT(*) AS errors,
  COUNT(DISTINCT run_id) AS runs,
  MIN(failed_at) AS first_failed_at,
  MAX(failed_at) AS last_failed_at
FROM selected_errors
GROUP BY reason
ORDER BY errors DESC, reason
