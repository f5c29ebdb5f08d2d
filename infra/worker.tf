# Worker VMs: Container-Optimized OS instances started from a template whose cloud-init runs the
# worker container, in a regional managed instance group that heals, rolls and autoscales on the
# jobs subscription's backlog (per VM) and on CPU.

data "google_compute_image" "cos" {
  family  = var.cos_image_family
  project = "cos-cloud"
}

data "google_compute_zones" "available" {
  region = var.region
  status = "UP"

  depends_on = [google_project_service.apis]
}

locals {
  worker_zones = data.google_compute_zones.available.names

  # The container's environment: the settings read by worker/settings.py.
  worker_env = {
    GOOGLE_CLOUD_PROJECT         = var.project_id
    WORKER_SUBSCRIPTION          = google_pubsub_subscription.jobs.id
    WORKER_RESULTS_TABLE         = local.results_table_id
    WORKER_ERRORS_TABLE          = local.errors_table_id
    WORKER_BATCHES_TABLE         = local.batches_table_id
    WORKER_MODEL_DIR             = var.worker_model_dir
    WORKER_ENGINE                = var.worker_engine
    WORKER_PRECISION             = var.worker_precision
    WORKER_BATCH_SIZE            = tostring(var.worker_batch_size)
    WORKER_MAX_DELIVERY_ATTEMPTS = tostring(var.max_delivery_attempts)
  }

  worker_cloud_init = templatefile("${path.module}/templates/worker-cloud-init.yaml.tftpl", {
    image          = local.worker_image
    registry_host  = local.registry_host
    env_file       = join("\n", [for name in sort(keys(local.worker_env)) : "${name}=${local.worker_env[name]}"])
    stop_timeout_s = 30
  })
}

resource "google_compute_instance_template" "worker" {
  name_prefix  = "${var.name_prefix}-worker-"
  description  = "Inference worker ${var.worker_image_name}:${var.worker_image_tag} on Container-Optimized OS"
  machine_type = var.worker_machine_type
  tags         = [local.worker_tag]

  disk {
    source_image = data.google_compute_image.cos.self_link
    boot         = true
    auto_delete  = true
    disk_type    = "pd-balanced"
    disk_size_gb = var.worker_boot_disk_gb
  }

  # No access_config block: the VMs get no public IP.
  network_interface {
    subnetwork = google_compute_subnetwork.workers.id
  }

  service_account {
    email  = google_service_account.worker.email
    scopes = ["cloud-platform"]
  }

  shielded_instance_config {
    enable_secure_boot          = true
    enable_vtpm                 = true
    enable_integrity_monitoring = true
  }

  scheduling {
    provisioning_model          = var.worker_spot ? "SPOT" : "STANDARD"
    preemptible                 = var.worker_spot
    automatic_restart           = !var.worker_spot
    on_host_maintenance         = var.worker_spot ? "TERMINATE" : "MIGRATE"
    instance_termination_action = var.worker_spot ? "DELETE" : null
  }

  metadata = {
    user-data                 = local.worker_cloud_init
    google-logging-enabled    = "true"
    google-monitoring-enabled = "true"
    # Instances are replaced, never patched in place.
    cos-update-strategy    = "update_disabled"
    block-project-ssh-keys = "true"
    enable-oslogin         = "TRUE"
  }

  lifecycle {
    create_before_destroy = true
  }
}

resource "google_compute_health_check" "worker" {
  name                = "${var.name_prefix}-worker-healthz"
  description         = "Worker liveness: GET /healthz on port 8080."
  check_interval_sec  = 10
  timeout_sec         = 5
  healthy_threshold   = 2
  unhealthy_threshold = 3

  http_health_check {
    port         = 8080
    request_path = "/healthz"
  }

  log_config {
    enable = true
  }
}

resource "google_compute_region_instance_group_manager" "workers" {
  name               = "${var.name_prefix}-workers"
  region             = var.region
  base_instance_name = "${var.name_prefix}-worker"

  distribution_policy_zones = local.worker_zones

  version {
    name              = "primary"
    instance_template = google_compute_instance_template.worker.self_link_unique
  }

  # The autoscaler sets the size; Terraform leaves target_size alone.

  dynamic "auto_healing_policies" {
    for_each = var.enable_autohealing ? [1] : []
    content {
      health_check      = google_compute_health_check.worker.id
      initial_delay_sec = var.autohealing_initial_delay_s
    }
  }

  # New template -> replace VMs one surge per zone at a time, never dropping below the current size.
  # Cloud Build runs the same roll explicitly (gcloud ... rolling-action start-update) and waits for it.
  update_policy {
    type                           = "PROACTIVE"
    minimal_action                 = "REPLACE"
    most_disruptive_allowed_action = "REPLACE"
    replacement_method             = "SUBSTITUTE"
    instance_redistribution_type   = "PROACTIVE"
    # A regional group's fixed surge must be 0 or at least its number of zones.
    max_surge_fixed       = length(local.worker_zones)
    max_unavailable_fixed = 0
  }

  wait_for_instances = false
}

resource "google_compute_region_autoscaler" "workers" {
  # filter and single_instance_assignment on a Cloud Monitoring metric need google-beta.
  provider = google-beta

  name   = "${var.name_prefix}-workers"
  region = var.region
  target = google_compute_region_instance_group_manager.workers.id

  autoscaling_policy {
    min_replicas    = var.min_workers
    max_replicas    = var.max_workers
    cooldown_period = var.autoscaler_cooldown_s
    mode            = "ON"

    # Backlog per VM: undelivered jobs / messages_per_worker VMs. A per-group metric, so it can also
    # scale up from zero.
    metric {
      name                       = "pubsub.googleapis.com/subscription/num_undelivered_messages"
      filter                     = "resource.type = pubsub_subscription AND resource.labels.subscription_id = \"${google_pubsub_subscription.jobs.name}\""
      single_instance_assignment = var.messages_per_worker
    }

    # Second signal: the group's average CPU.
    cpu_utilization {
      target = var.cpu_target
    }

    # Scale in gently: at most one VM per 5 minutes, so a short lull does not drop warm workers.
    scale_in_control {
      time_window_sec = 300
      max_scaled_in_replicas {
        fixed = 1
      }
    }
  }
}
