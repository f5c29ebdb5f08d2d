# Reconcile: Cloud Scheduler runs a Cloud Run job, `python -m worker reconcile` in the worker image,
# which lists the uploads of the last 26 hours and compares them with the results and errors
# tables. It ends with one structured log line (jsonPayload.reconcile_missing = uploads without a
# row); a log-based metric counts the runs that found any, and an alert policy fires on it.
# Dry run by default: reconcile_republish = true makes the job publish the missing uploads' jobs
# (safe to repeat: one row per upload). Settings are the ones `python -m worker reconcile --help` lists.

# --- Variables --------------------------------------------------------------------------------

variable "reconcile_schedule" {
  description = "Cron schedule (UTC) of the reconcile job. Each run looks back 26 hours, so consecutive runs overlap and a missed run loses nothing."
  type        = string
  default     = "0 * * * *"
}

variable "reconcile_republish" {
  description = "false: the reconcile job only reports uploads without a row (and the alert fires); true: it also publishes their jobs again (RECONCILE_REPUBLISH)."
  type        = bool
  default     = false
}

variable "reconcile_alert_notification_channels" {
  description = "Cloud Monitoring notification channel ids (projects/P/notificationChannels/N) told when reconcile finds uploads without a row or fails. Empty: incidents show in the console only."
  type        = list(string)
  default     = []
}

# --- The job --------------------------------------------------------------------------------

locals {
  # The settings worker/__main__.py's `reconcile` command reads (see its --help).
  reconcile_env = {
    GOOGLE_CLOUD_PROJECT = var.project_id
    RECONCILE_BUCKET     = google_storage_bucket.uploads.name
    RECONCILE_PREFIX     = var.upload_prefix
    RECONCILE_REPUBLISH  = tostring(var.reconcile_republish)
    WORKER_RESULTS_TABLE = local.results_table_id
    WORKER_ERRORS_TABLE  = local.errors_table_id
    JOBS_TOPIC           = google_pubsub_topic.jobs.id
  }
}

resource "google_project_service" "cloudscheduler" {
  project            = var.project_id
  service            = "cloudscheduler.googleapis.com"
  disable_on_destroy = false
}

resource "google_service_account" "reconcile" {
  account_id   = "${var.name_prefix}-reconcile"
  display_name = "Reconcile job"
  description  = "Lists uploads, reads the results and errors tables, and (when republishing) publishes jobs."

  depends_on = [google_project_service.apis]
}

resource "google_cloud_run_v2_job" "reconcile" {
  name                = "${var.name_prefix}-reconcile"
  location            = var.region
  description         = "python -m worker reconcile: uploads of the last 26 h without a row in ${local.results_table_id} or ${local.errors_table_id}"
  deletion_protection = false # no state: the job is its configuration, recreated by apply

  template {
    task_count  = 1
    parallelism = 1

    template {
      service_account = google_service_account.reconcile.email
      timeout         = "3600s"
      # A failed run is retried by the next scheduled one (its window overlaps this one's).
      max_retries = 0

      containers {
        # The worker image: ENTRYPOINT ["python", "-m", "worker"]; args replace its CMD ["serve"].
        image = local.worker_image
        args  = ["reconcile", "--since", "26h"]

        resources {
          # The rowed keys of the window are held in memory: ~170 MB per million uploads.
          limits = {
            cpu    = "1"
            memory = "1Gi"
          }
        }

        dynamic "env" {
          for_each = local.reconcile_env
          content {
            name  = env.key
            value = env.value
          }
        }
      }
    }
  }

  depends_on = [google_project_service.apis]
}

# --- Least privilege: list one bucket, read two tables, run queries, publish to one topic ----

resource "google_storage_bucket_iam_member" "reconcile_lists_uploads" {
  bucket = google_storage_bucket.uploads.name
  role   = "roles/storage.objectViewer"
  member = google_service_account.reconcile.member
}

resource "google_bigquery_table_iam_member" "reconcile_reads_rows" {
  for_each = {
    results = google_bigquery_table.results.table_id
    errors  = google_bigquery_table.errors.table_id
  }

  dataset_id = google_bigquery_dataset.inference.dataset_id
  table_id   = each.value
  role       = "roles/bigquery.dataViewer"
  member     = google_service_account.reconcile.member
}

# Query jobs are created at project level.
resource "google_project_iam_member" "reconcile_runs_queries" {
  project = var.project_id
  role    = "roles/bigquery.jobUser"
  member  = google_service_account.reconcile.member
}

# Only while republishing: a dry run cannot publish at all.
resource "google_pubsub_topic_iam_member" "reconcile_publishes_jobs" {
  count = var.reconcile_republish ? 1 : 0

  topic  = google_pubsub_topic.jobs.name
  role   = "roles/pubsub.publisher"
  member = google_service_account.reconcile.member
}

# --- The schedule -----------------------------------------------------------------------------

resource "google_service_account" "reconcile_scheduler" {
  account_id   = "${var.name_prefix}-scheduler"
  display_name = "Reconcile schedule"
  description  = "Cloud Scheduler's identity: may only start the reconcile job."

  depends_on = [google_project_service.apis]
}

resource "google_cloud_run_v2_job_iam_member" "scheduler_runs_reconcile" {
  project  = var.project_id
  location = google_cloud_run_v2_job.reconcile.location
  name     = google_cloud_run_v2_job.reconcile.name
  role     = "roles/run.invoker"
  member   = google_service_account.reconcile_scheduler.member
}

resource "google_cloud_scheduler_job" "reconcile" {
  name             = "${var.name_prefix}-reconcile"
  region           = var.region
  description      = "Starts the ${google_cloud_run_v2_job.reconcile.name} Cloud Run job."
  schedule         = var.reconcile_schedule
  time_zone        = "Etc/UTC"
  attempt_deadline = "60s"

  retry_config {
    retry_count = 2
  }

  # The Cloud Run Admin API's jobs.run: starts an execution and returns at once.
  http_target {
    http_method = "POST"
    uri         = "https://run.googleapis.com/v2/projects/${var.project_id}/locations/${var.region}/jobs/${google_cloud_run_v2_job.reconcile.name}:run"

    oauth_token {
      service_account_email = google_service_account.reconcile_scheduler.email
      scope                 = "https://www.googleapis.com/auth/cloud-platform"
    }
  }

  depends_on = [google_project_service.cloudscheduler, google_cloud_run_v2_job_iam_member.scheduler_runs_reconcile]
}

# --- The alert --------------------------------------------------------------------------------

# One count per reconcile run that found uploads without a row (its last log line, WARNING).
resource "google_logging_metric" "reconcile_missing" {
  name        = "${var.name_prefix}/reconcile_missing_uploads"
  description = "Reconcile runs that found uploads without a results or errors row."
  filter = join(" AND ", [
    "resource.type=\"cloud_run_job\"",
    "resource.labels.job_name=\"${google_cloud_run_v2_job.reconcile.name}\"",
    "jsonPayload.reconcile_missing > 0",
  ])

  metric_descriptor {
    metric_kind = "DELTA"
    value_type  = "INT64"
    unit        = "1"
  }
}

resource "google_monitoring_alert_policy" "reconcile" {
  display_name          = "${var.name_prefix}: uploads without a row"
  combiner              = "OR"
  notification_channels = var.reconcile_alert_notification_channels
  severity              = "WARNING"

  conditions {
    display_name = "reconcile found uploads without a row"
    condition_threshold {
      filter          = "resource.type = \"cloud_run_job\" AND metric.type = \"logging.googleapis.com/user/${google_logging_metric.reconcile_missing.name}\""
      comparison      = "COMPARISON_GT"
      threshold_value = 0
      duration        = "0s"
      aggregations {
        alignment_period   = "600s"
        per_series_aligner = "ALIGN_SUM"
      }
      trigger {
        count = 1
      }
    }
  }

  # A run that fails (a resource it cannot read, a crash) writes no summary line: alert on that too.
  conditions {
    display_name = "reconcile job execution failed"
    condition_threshold {
      filter          = "resource.type = \"cloud_run_job\" AND resource.labels.job_name = \"${google_cloud_run_v2_job.reconcile.name}\" AND metric.type = \"run.googleapis.com/job/completed_execution_count\" AND metric.labels.result = \"failed\""
      comparison      = "COMPARISON_GT"
      threshold_value = 0
      duration        = "0s"
      aggregations {
        alignment_period   = "600s"
        per_series_aligner = "ALIGN_SUM"
      }
      trigger {
        count = 1
      }
    }
  }

  alert_strategy {
    # The next clean run leaves the metric at zero; close the incident after two quiet hours.
    auto_close = "7200s"
  }

  documentation {
    mime_type = "text/markdown"
    content   = <<-EOT
      Some uploads to gs://${google_storage_bucket.uploads.name}/${var.upload_prefix} have no row in
      ${local.results_table_id} or ${local.errors_table_id} (or the reconcile job failed).
      The job's last log line lists the counts (jsonPayload.reconcile_missing, reconcile_listed,
      reconcile_republished); its stdout has one line per upload without a row.
      Logs: `gcloud logging read 'resource.type="cloud_run_job" AND resource.labels.job_name="${google_cloud_run_v2_job.reconcile.name}"' --limit 50`.
      To publish their jobs again (safe to repeat):
      `gcloud run jobs execute ${google_cloud_run_v2_job.reconcile.name} --region ${var.region} --update-env-vars RECONCILE_REPUBLISH=true`
      (needs roles/pubsub.publisher on the jobs topic: apply with reconcile_republish = true, or grant it).
    EOT
  }
}

output "reconcile_job" {
  description = "Cloud Run job that finds uploads without a row; run it now with the command in reconcile_run_command."
  value       = google_cloud_run_v2_job.reconcile.name
}

output "reconcile_run_command" {
  description = "Runs the reconcile job once (dry run unless reconcile_republish); its last log line has reconcile_missing."
  value       = "gcloud run jobs execute ${google_cloud_run_v2_job.reconcile.name} --project=${var.project_id} --region=${var.region} --wait"
}
