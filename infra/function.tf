# The 2nd-gen Cloud Function: a finalized object in the upload bucket -> one job on Pub/Sub.

data "archive_file" "function_source" {
  type = "zip"
  # Inside .terraform/ so the generated archive is never committed.
  output_path = "${path.module}/.terraform/tmp/function-source.zip"

  source {
    content  = file("${path.module}/../functions/main.py")
    filename = "main.py"
  }

  # The job contract main.py imports (the worker's reconcile job uses the same file).
  source {
    content  = file("${path.module}/../functions/storage_job.py")
    filename = "storage_job.py"
  }

  source {
    content  = file("${path.module}/../functions/requirements.txt")
    filename = "requirements.txt"
  }
}

# The object name carries the archive's hash: a code change uploads a new object and redeploys.
resource "google_storage_bucket_object" "function_source" {
  name   = "on-upload/${data.archive_file.function_source.output_md5}.zip"
  bucket = google_storage_bucket.function_source.name
  source = data.archive_file.function_source.output_path
}

resource "google_cloudfunctions2_function" "on_upload" {
  name        = "${var.name_prefix}-on-upload"
  location    = var.region
  description = "GCS object finalized -> inference job on ${google_pubsub_topic.jobs.name}"

  build_config {
    runtime     = "python311"
    entry_point = "on_object_finalized"
    # A dedicated build identity instead of the default compute service account.
    service_account = google_service_account.function_build.id

    source {
      storage_source {
        bucket = google_storage_bucket.function_source.name
        object = google_storage_bucket_object.function_source.name
      }
    }
  }

  service_config {
    min_instance_count               = 0
    max_instance_count               = var.function_max_instances
    available_memory                 = var.function_memory
    timeout_seconds                  = 60
    max_instance_request_concurrency = 1
    # Events arrive from Eventarc inside Google's network; nothing else may call the function.
    ingress_settings               = "ALLOW_INTERNAL_ONLY"
    all_traffic_on_latest_revision = true
    service_account_email          = google_service_account.function.email

    # The settings documented in functions/main.py.
    environment_variables = {
      JOBS_TOPIC      = google_pubsub_topic.jobs.id
      UPLOAD_BUCKET   = google_storage_bucket.uploads.name
      UPLOAD_PREFIX   = var.upload_prefix
      MAX_EVENT_AGE_S = tostring(var.max_event_age_s)
    }
  }

  event_trigger {
    # Must be the bucket's location.
    trigger_region        = var.region
    event_type            = "google.cloud.storage.object.v1.finalized"
    retry_policy          = "RETRY_POLICY_RETRY"
    service_account_email = google_service_account.function_trigger.email

    event_filters {
      attribute = "bucket"
      value     = google_storage_bucket.uploads.name
    }
  }

  depends_on = [
    google_project_iam_member.gcs_agent_publishes_events,
    google_project_iam_member.trigger_receives_events,
    google_project_iam_member.function_build,
    google_pubsub_topic_iam_member.function_publishes_jobs,
  ]
}

# Eventarc delivers to the function's Cloud Run service as the trigger service account.
resource "google_cloud_run_v2_service_iam_member" "trigger_invokes_function" {
  project  = var.project_id
  location = google_cloudfunctions2_function.on_upload.location
  name     = google_cloudfunctions2_function.on_upload.name
  role     = "roles/run.invoker"
  member   = google_service_account.function_trigger.member
}
