# Dataset, tables and views. The table schemas are the very files the code uses (sql/*.json, also
# read by localcloud/resources.py), and the views are sql/views/*.sql rendered with templatefile.

resource "google_bigquery_dataset" "inference" {
  #checkov:skip=CKV_GCP_81:Rows hold predictions and timings of uploaded images, no personal data; Google-managed encryption at rest. A CMEK would need a KMS key ring in the dataset location that can never be deleted.
  dataset_id  = var.dataset_id
  location    = local.dataset_location
  description = "Image-inference results and per-upload errors."

  delete_contents_on_destroy = false

  depends_on = [google_project_service.apis]
}

resource "google_bigquery_table" "results" {
  #checkov:skip=CKV_GCP_80:Same data classification as the dataset: Google-managed encryption at rest.
  dataset_id  = google_bigquery_dataset.inference.dataset_id
  table_id    = "results"
  description = "One row per classified upload (event_key is the insertId)."
  schema      = file("${path.module}/../sql/results_schema.json")

  time_partitioning {
    type          = "DAY"
    field         = "processed_at"
    expiration_ms = var.partition_expiration_days == null ? null : var.partition_expiration_days * 86400000
  }

  clustering = ["engine", "model_version"]

  deletion_protection = var.table_deletion_protection
}

resource "google_bigquery_table" "errors" {
  #checkov:skip=CKV_GCP_80:Same data classification as the dataset: Google-managed encryption at rest.
  dataset_id  = google_bigquery_dataset.inference.dataset_id
  table_id    = "errors"
  description = "One row per upload that could not be classified, with a reason."
  schema      = file("${path.module}/../sql/errors_schema.json")

  time_partitioning {
    type          = "DAY"
    field         = "failed_at"
    expiration_ms = var.partition_expiration_days == null ? null : var.partition_expiration_days * 86400000
  }

  deletion_protection = var.table_deletion_protection
}

resource "google_bigquery_table" "batches" {
  #checkov:skip=CKV_GCP_80:Same data classification as the dataset: Google-managed encryption at rest.
  dataset_id  = google_bigquery_dataset.inference.dataset_id
  table_id    = "batches"
  description = "One row per engine call: sink time and batch facts (results join it on batch_id)."
  schema      = file("${path.module}/../sql/batches_schema.json")

  time_partitioning {
    type          = "DAY"
    field         = "processed_at"
    expiration_ms = var.partition_expiration_days == null ? null : var.partition_expiration_days * 86400000
  }

  clustering = ["engine", "worker_host"]

  deletion_protection = var.table_deletion_protection
}

resource "google_bigquery_table" "views" {
  #checkov:skip=CKV_GCP_80:A view stores no data, only a query over the tables above.
  #checkov:skip=CKV_GCP_121:Views hold no data and are recreated from sql/views/ on every apply; protecting them would only block renames.
  for_each = fileset("${path.module}/../sql/views", "*.sql")

  dataset_id = google_bigquery_dataset.inference.dataset_id
  table_id   = trimsuffix(each.value, ".sql")

  view {
    query = templatefile("${path.module}/../sql/views/${each.value}", {
      project = var.project_id
      dataset = google_bigquery_dataset.inference.dataset_id
    })
    use_legacy_sql = false
  }

  deletion_protection = false

  depends_on = [google_bigquery_table.results, google_bigquery_table.errors, google_bigquery_table.batches]
}
