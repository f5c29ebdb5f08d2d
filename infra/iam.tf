# One service account per job, each with only what it needs. Nothing runs as the default compute
# service account.

# --- Worker VMs -----------------------------------------------------------------------------

resource "google_service_account" "worker" {
  account_id   = "${var.name_prefix}-worker"
  display_name = "Inference worker VMs"
  description  = "Reads uploads and models, pulls jobs, writes rows to BigQuery, writes logs and metrics."

  depends_on = [google_project_service.apis]
}

resource "google_storage_bucket_iam_member" "worker_reads_uploads" {
  bucket = google_storage_bucket.uploads.name
  role   = "roles/storage.objectViewer"
  member = google_service_account.worker.member
}

resource "google_storage_bucket_iam_member" "worker_reads_models" {
  bucket = google_storage_bucket.models.name
  role   = "roles/storage.objectViewer"
  member = google_service_account.worker.member
}

resource "google_pubsub_subscription_iam_member" "worker_pulls_jobs" {
  subscription = google_pubsub_subscription.jobs.name
  role         = "roles/pubsub.subscriber"
  member       = google_service_account.worker.member
}

resource "google_bigquery_dataset_iam_member" "worker_writes_rows" {
  dataset_id = google_bigquery_dataset.inference.dataset_id
  role       = "roles/bigquery.dataEditor"
  member     = google_service_account.worker.member
}

resource "google_artifact_registry_repository_iam_member" "worker_pulls_images" {
  location   = google_artifact_registry_repository.images.location
  repository = google_artifact_registry_repository.images.name
  role       = "roles/artifactregistry.reader"
  member     = google_service_account.worker.member
}

# Log and metric writers exist only at project level.
resource "google_project_iam_member" "worker_telemetry" {
  for_each = toset(["roles/logging.logWriter", "roles/monitoring.metricWriter"])

  project = var.project_id
  role    = each.value
  member  = google_service_account.worker.member
}

# --- Cloud Function -------------------------------------------------------------------------

# Runtime identity: may only publish to the jobs topic.
resource "google_service_account" "function" {
  account_id   = "${var.name_prefix}-function"
  display_name = "Upload function runtime"
  description  = "Publishes one job per uploaded object to the jobs topic."

  depends_on = [google_project_service.apis]
}

resource "google_pubsub_topic_iam_member" "function_publishes_jobs" {
  topic  = google_pubsub_topic.jobs.name
  role   = "roles/pubsub.publisher"
  member = google_service_account.function.member
}

# Identity Eventarc uses to deliver events to the function.
resource "google_service_account" "function_trigger" {
  account_id   = "${var.name_prefix}-trigger"
  display_name = "Upload function Eventarc trigger"
  description  = "Receives Cloud Storage events and invokes the upload function."

  depends_on = [google_project_service.apis]
}

resource "google_project_iam_member" "trigger_receives_events" {
  project = var.project_id
  role    = "roles/eventarc.eventReceiver"
  member  = google_service_account.function_trigger.member
}

# Identity Cloud Build uses to build the function (documented roles for a user-specified build
# service account: logs, the gcf-artifacts image repository, and reading the uploaded source).
resource "google_service_account" "function_build" {
  account_id   = "${var.name_prefix}-fn-build"
  display_name = "Upload function build"
  description  = "Builds the upload function's container from its source archive."

  depends_on = [google_project_service.apis]
}

resource "google_project_iam_member" "function_build" {
  for_each = toset([
    "roles/logging.logWriter",
    "roles/artifactregistry.writer",
    "roles/storage.objectAdmin",
  ])

  project = var.project_id
  role    = each.value
  member  = google_service_account.function_build.member
}

# Cloud Storage publishes object events to Pub/Sub (Eventarc's transport) as its service agent.
data "google_storage_project_service_account" "gcs" {
  project = var.project_id

  depends_on = [google_project_service.apis]
}

resource "google_project_iam_member" "gcs_agent_publishes_events" {
  project = var.project_id
  role    = "roles/pubsub.publisher"
  member  = "serviceAccount:${data.google_storage_project_service_account.gcs.email_address}"
}
