# Shared names, project facts and the APIs the pipeline needs.

locals {
  labels = merge({ app = "gcs-inference-pipeline", managed-by = "terraform" }, var.labels)

  upload_bucket_name   = coalesce(var.upload_bucket_name, "${var.project_id}-uploads")
  models_bucket_name   = coalesce(var.models_bucket_name, "${var.project_id}-models")
  training_bucket_name = coalesce(var.training_bucket_name, "${var.project_id}-training")
  source_bucket_name   = "${var.project_id}-function-source"
  dataset_location     = coalesce(var.dataset_location, var.region)

  # Table ids as the worker wants them: project.dataset.table.
  results_table_id = "${var.project_id}.${google_bigquery_dataset.inference.dataset_id}.${google_bigquery_table.results.table_id}"
  errors_table_id  = "${var.project_id}.${google_bigquery_dataset.inference.dataset_id}.${google_bigquery_table.errors.table_id}"
  batches_table_id = "${var.project_id}.${google_bigquery_dataset.inference.dataset_id}.${google_bigquery_table.batches.table_id}"

  registry_host = "${var.region}-docker.pkg.dev"
  image_base    = "${local.registry_host}/${var.project_id}/${google_artifact_registry_repository.images.repository_id}"
  worker_image  = "${local.image_base}/${var.worker_image_name}:${var.worker_image_tag}"

  worker_tag = "${var.name_prefix}-worker"

  # Pub/Sub's own service agent (service-PROJECT_NUMBER@gcp-sa-pubsub) moves messages to the
  # dead-letter topic.
  pubsub_service_agent = "serviceAccount:${google_project_service_identity.pubsub.email}"
}

resource "google_project_service" "apis" {
  for_each = toset([
    "aiplatform.googleapis.com",
    "artifactregistry.googleapis.com",
    "bigquery.googleapis.com",
    "cloudbuild.googleapis.com",
    "cloudfunctions.googleapis.com",
    "cloudresourcemanager.googleapis.com",
    "compute.googleapis.com",
    "eventarc.googleapis.com",
    "iam.googleapis.com",
    "logging.googleapis.com",
    "monitoring.googleapis.com",
    "pubsub.googleapis.com",
    "run.googleapis.com",
    "storage.googleapis.com",
  ])

  project = var.project_id
  service = each.value
  # Turning an API off on destroy could break other workloads in the project.
  disable_on_destroy = false
}

# Makes sure the Pub/Sub service agent exists before IAM grants name it.
resource "google_project_service_identity" "pubsub" {
  provider = google-beta

  project = var.project_id
  service = "pubsub.googleapis.com"

  depends_on = [google_project_service.apis]
}
