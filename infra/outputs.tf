output "upload_bucket" {
  description = "Upload images here, under upload_prefix: gsutil cp IMAGE gs://BUCKET/PREFIX"
  value       = google_storage_bucket.uploads.name
}

output "upload_prefix" {
  description = "Only objects under this prefix are classified."
  value       = var.upload_prefix
}

output "upload_example" {
  description = "A command that uploads one image into the pipeline."
  value       = "gsutil cp IMAGE.png gs://${google_storage_bucket.uploads.name}/${var.upload_prefix}"
}

output "models_bucket" {
  description = "Bucket for published model versions (gs://BUCKET/models/NAME/VERSION/)."
  value       = google_storage_bucket.models.name
}

output "jobs_topic" {
  description = "Topic the function publishes jobs to."
  value       = google_pubsub_topic.jobs.id
}

output "jobs_subscription" {
  description = "Subscription the workers pull from; its backlog drives the autoscaler."
  value       = google_pubsub_subscription.jobs.id
}

output "dead_letter_subscription" {
  description = "Subscription holding jobs that failed max_delivery_attempts times."
  value       = google_pubsub_subscription.dead_letter_hold.id
}

output "results_table" {
  description = "BigQuery table with one row per classified upload (project.dataset.table)."
  value       = local.results_table_id
}

output "errors_table" {
  description = "BigQuery table with one row per upload that failed (project.dataset.table)."
  value       = local.errors_table_id
}

output "views" {
  description = "Views created from sql/views/*.sql."
  value       = [for view in google_bigquery_table.views : "${var.project_id}.${view.dataset_id}.${view.table_id}"]
}

output "docker_repository" {
  description = "Artifact Registry path to push images to: REPOSITORY/IMAGE:TAG."
  value       = local.image_base
}

output "worker_image" {
  description = "Image the worker VMs run."
  value       = local.worker_image
}

output "function_name" {
  description = "The upload function (2nd gen)."
  value       = google_cloudfunctions2_function.on_upload.name
}

output "worker_instance_template" {
  description = "Name of the instance template of the current worker version (what a roll targets)."
  value       = google_compute_instance_template.worker.name
}

output "worker_max_surge" {
  description = "VMs a roll may add above the group's size: the group's number of zones (the least a regional group accepts)."
  value       = length(local.worker_zones)
}

output "worker_instance_group" {
  description = "Regional managed instance group of the workers."
  value       = google_compute_region_instance_group_manager.workers.name
}

output "worker_service_account" {
  description = "Service account of the worker VMs."
  value       = google_service_account.worker.email
}

output "roll_command" {
  description = "Replaces every worker VM with the current template (Cloud Build runs this after terraform apply)."
  value = join(" ", [
    "gcloud compute instance-groups managed rolling-action start-update",
    google_compute_region_instance_group_manager.workers.name,
    "--project=${var.project_id}",
    "--region=${var.region}",
    "--version=template=${google_compute_instance_template.worker.name}",
    "--type=proactive",
    "--max-surge=${length(local.worker_zones)}",
    "--max-unavailable=0",
  ])
}

output "training_bucket" {
  description = "Bucket for training datasets: gcloud storage cp -r DATASET gs://BUCKET/datasets/NAME"
  value       = google_storage_bucket.training.name
}

output "training_service_account" {
  description = "Identity of Vertex AI training jobs (cloud-train --service-account)."
  value       = google_service_account.trainer.email
}

output "cloud_train_command" {
  description = "Trains the demo model in a Vertex AI custom job and publishes the next version for the workers."
  value = join(" ", [
    "python -m modelkit cloud-train",
    "--project=${var.project_id}",
    "--region=${var.region}",
    "--image=${local.image_base}/train:COMMIT_SHA",
    "--service-account=${google_service_account.trainer.email}",
    "--data=gs://${google_storage_bucket.training.name}/datasets/demo",
    "--out=gs://${google_storage_bucket.models.name}/models",
    "--name=demo",
  ])
}
