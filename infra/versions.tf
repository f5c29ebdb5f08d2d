# Provider versions are pinned exactly: `terraform init` writes .terraform.lock.hcl with their
# hashes; commit that file after the first init (it cannot be produced without registry access).
terraform {
  required_version = ">= 1.5.0, < 2.0.0"

  required_providers {
    google = {
      source  = "hashicorp/google"
      version = "7.45.0"
    }
    # The autoscaler's Pub/Sub metric (filter, single_instance_assignment) needs google-beta.
    google-beta = {
      source  = "hashicorp/google-beta"
      version = "7.45.0"
    }
    archive = {
      source  = "hashicorp/archive"
      version = "2.7.1"
    }
  }

  # State lives in a GCS bucket shared by people and Cloud Build; give the bucket at init:
  #   terraform init -backend-config="bucket=PROJECT-tfstate" -backend-config="prefix=inference-pipeline"
  backend "gcs" {}
}
