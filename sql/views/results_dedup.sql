-- One row per upload: the first row written for each event key. insertId de-duplication is best
-- effort (about a minute), so a redelivery long after the first insert can add a second row.
SELECT *
FROM `${project}.${dataset}.results`
WHERE TRUE
QUALIFY ROW_NUMBER() OVER (PARTITION BY event_key ORDER BY processed_at) = 1
