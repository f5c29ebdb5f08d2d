# Buckets: uploads (the pipeline's input), models, and the function's source archives.

resource "google_storage_bucket" "uploads" {
  #checkov:skip=CKV_GCP_62:Access logs would go to yet another bucket; object reads and writes are audited with Cloud Audit Logs (Data Access logs for storage.googleapis.com) instead.
  name          = local.upload_bucket_name
  location      = upper(var.region)
  storage_class = "STANDARD"
  force_destroy = var.force_destroy_buckets

  uniform_bucket_level_access = true
  public_access_prevention    = "enforced"

  # A re-upload of the same name makes a new generation; versioning keeps the older one readable
  # for the job that names it, until the noncurrent rule below removes it.
  versioning {
    enabled = true
  }

  lifecycle_rule {
    condition {
      age = var.upload_retention_days
    }
    action {
      type = "Delete"
    }
  }

  lifecycle_rule {
    condition {
      days_since_noncurrent_time = var.noncurrent_version_retention_days
      with_state                 = "ARCHIVED"
    }
    action {
      type = "Delete"
    }
  }

  depends_on = [google_project_service.apis]
}

resource "google_storage_bucket" "models" {
  #checkov:skip=CKV_GCP_62:Access logs would go to yet another bucket; reads are audited with Cloud Audit Logs (Data Access logs for storage.googleapis.com) instead.
  name          = local.models_bucket_name
  location      = upper(var.region)
  storage_class = "STANDARD"
  force_destroy = var.force_destroy_buckets

  uniform_bucket_level_access = true
  public_access_prevention    = "enforced"

  # A model version is immutable once published; versioning protects it from an accidental overwrite.
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

resource "google_storage_bucket" "function_source" {
  #checkov:skip=CKV_GCP_62:Holds only the function's source zips that Terraform uploads; Cloud Audit Logs record access.
  name          = local.source_bucket_name
  location      = upper(var.region)
  storage_class = "STANDARD"
  # Only generated archives live here: destroying the stack may always delete them.
  force_destroy = true

  uniform_bucket_level_access = true
  public_access_prevention    = "enforced"

  versioning {
    enabled = true
  }

  lifecycle_rule {
    condition {
      days_since_noncurrent_time = 30
      with_state                 = "ARCHIVED"
    }
    action {
      type = "Delete"
    }
  }

  depends_on = [google_project_service.apis]
}
