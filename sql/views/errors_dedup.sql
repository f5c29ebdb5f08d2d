-- One error row per upload (see results_dedup.sql for why duplicates can exist at all).
SELECT *
FROM `${project}.${dataset}.errors`
WHERE TRUE
QUALIFY ROW_NUMBER() OVER (PARTITION BY event_key ORDER BY failed_at) = 1
