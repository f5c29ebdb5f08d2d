# Training in the cloud (python -m modelkit cloud-train): a Vertex AI custom job runs the training
# image as its own service account, reads a dataset from the training bucket and publishes a new
# model version under gs://MODELS_BUCKET/models/, where the workers pick it up (worker/rollout.py).

resource "google_storage_bucket" "training" {
  #checkov:skip=CKV_GCP_62:Access logs would go to yet another bucket; reads of datasets are audited with Cloud Audit Logs (Data Access logs for storage.googleapis.com) instead.
  name          = local.training_bucket_name
  location      = upper(var.region)
  storage_class = "STANDARD"
  force_destroy = var.force_destroy_buckets

  uniform_bucket_level_access = true
  public_access_prevention    = "enforced"

  # A dataset a model version names (manifest dataset.source) should stay readable as it was.
  versioning {
    enabled = true
  }

  lifecycle_rule {
    condition {
      days_since_noncurrent_time = 90
      with_state                 = "ARCHIVED"
    }
    action {
      type = "Delete"
    }
  }

  depends_on = [google_project_service.apis]
}

resource "google_service_account" "trainer" {
  account_id   = "${var.name_prefix}-trainer"
  display_name = "Vertex AI training jobs"
  description  = "Runs the training image: reads datasets, publishes new model versions, writes logs."

  depends_on = [google_project_service.apis]
}

# Datasets: read and list (Cloud Storage FUSE at /gcs and the download both list the prefix).
resource "google_storage_bucket_iam_member" "trainer_reads_datasets" {
  bucket = google_storage_bucket.training.name
  role   = "roles/storage.objectViewer"
  member = google_service_account.trainer.member
}

# Model versions: list them (the next version number) and read manifests (publish checks a version
# is not already there).
resource "google_storage_bucket_iam_member" "trainer_reads_models" {
  bucket = google_storage_bucket.models.name
  role   = "roles/storage.objectViewer"
  member = google_service_account.trainer.member
}

# Publish under models/ only. objectCreator creates objects but cannot overwrite or delete them, so a
# published version stays immutable (`train --overwrite` needs a human with more rights).
resource "google_storage_bucket_iam_member" "trainer_publishes_models" {
  bucket = google_storage_bucket.models.name
  role   = "roles/storage.objectCreator"
  member = google_service_account.trainer.member

  condition {
    title       = "models-prefix-only"
    description = "New objects under models/ only."
    expression  = "resource.name.startsWith(\"projects/_/buckets/${google_storage_bucket.models.name}/objects/models/\")"
  }
}

# The image is pulled by Vertex AI's service agent; the job's own identity reads it too when a
# step inside the job needs the registry (and nothing else in it).
resource "google_artifact_registry_repository_iam_member" "trainer_reads_images" {
  location   = google_artifact_registry_repository.images.location
  repository = google_artifact_registry_repository.images.name
  role       = "roles/artifactregistry.reader"
  member     = google_service_account.trainer.member
}

# The job's JSON log lines (severity, step, metrics) go to Cloud Logging.
resource "google_project_iam_member" "trainer_writes_logs" {
  project = var.project_id
  role    = "roles/logging.logWriter"
  member  = google_service_account.trainer.member
}

# Whoever submits jobs: create and watch Vertex AI jobs, and run them as the trainer (actAs on that
# one service account, not on the project).
resource "google_project_iam_member" "training_submitters" {
  for_each = toset(var.training_submitters)

  project = var.project_id
  role    = "roles/aiplatform.user"
  member  = each.value
}

resource "google_service_account_iam_member" "training_submitters_act_as" {
  for_each = toset(var.training_submitters)

  service_account_id = google_service_account.trainer.name
  role               = "roles/iam.serviceAccountUser"
  member             = each.value
}
