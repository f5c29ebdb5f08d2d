resource "google_artifact_registry_repository" "images" {
  #checkov:skip=CKV_GCP_84:Images hold code and the demo model, no secrets; Google-managed encryption at rest.
  location      = var.region
  repository_id = var.artifact_repository_id
  description   = "Worker, training and TF Serving images, tagged with the commit SHA."
  format        = "DOCKER"

  # A commit SHA tag always names the same image.
  docker_config {
    immutable_tags = true
  }

  cleanup_policy_dry_run = false

  cleanup_policies {
    id     = "keep-recent"
    action = "KEEP"
    most_recent_versions {
      keep_count = 20
    }
  }

  cleanup_policies {
    id     = "delete-old"
    action = "DELETE"
    condition {
      tag_state  = "ANY"
      older_than = "7776000s"
    }
  }

  depends_on = [google_project_service.apis]
}
