# Jobs topic -> worker subscription; jobs that keep failing go to a dead-letter topic whose own
# subscription holds them (nothing is dropped). Same shape as the local stack (localcloud/resources.py).

resource "google_pubsub_topic" "jobs" {
  #checkov:skip=CKV_GCP_83:Jobs carry only object names and event metadata, encrypted at rest with Google-managed keys; a CMEK would add a KMS key ring that can never be deleted and per-message KMS calls.
  name                       = var.jobs_topic_name
  message_retention_duration = "86400s"

  depends_on = [google_project_service.apis]
}

resource "google_pubsub_topic" "dead_letter" {
  #checkov:skip=CKV_GCP_83:Dead-lettered jobs carry the same non-sensitive metadata as the jobs topic (Google-managed encryption at rest).
  name = var.dead_letter_topic_name
  # Topic retention (31 days, the maximum) lets a replay seek back further than the subscription keeps.
  message_retention_duration = "2678400s"

  depends_on = [google_project_service.apis]
}

resource "google_pubsub_subscription" "jobs" {
  name  = var.jobs_subscription_name
  topic = google_pubsub_topic.jobs.id

  ack_deadline_seconds       = var.ack_deadline_seconds
  message_retention_duration = "604800s"
  retain_acked_messages      = false

  # Never delete the subscription for inactivity (the default is 31 days).
  expiration_policy {
    ttl = ""
  }

  retry_policy {
    minimum_backoff = var.retry_minimum_backoff
    maximum_backoff = var.retry_maximum_backoff
  }

  dead_letter_policy {
    dead_letter_topic     = google_pubsub_topic.dead_letter.id
    max_delivery_attempts = var.max_delivery_attempts
  }

  # The service agent must be allowed to publish there and to ack here, or dead-lettering stalls.
  depends_on = [
    google_pubsub_topic_iam_member.dead_letter_publisher,
  ]
}

resource "google_pubsub_subscription" "dead_letter_hold" {
  name  = var.dead_letter_subscription_name
  topic = google_pubsub_topic.dead_letter.id

  ack_deadline_seconds       = 60
  message_retention_duration = "604800s"
  # Keep acked messages too, so an inspected job can still be replayed by seeking.
  retain_acked_messages = true

  expiration_policy {
    ttl = ""
  }
}

# --- IAM for the Pub/Sub service agent (dead-lettering) -------------------------------------

resource "google_pubsub_topic_iam_member" "dead_letter_publisher" {
  topic  = google_pubsub_topic.dead_letter.name
  role   = "roles/pubsub.publisher"
  member = local.pubsub_service_agent
}

resource "google_pubsub_subscription_iam_member" "dead_letter_source_subscriber" {
  subscription = google_pubsub_subscription.jobs.name
  role         = "roles/pubsub.subscriber"
  member       = local.pubsub_service_agent
}
