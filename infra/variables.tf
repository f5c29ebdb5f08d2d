# --- Project and naming ---------------------------------------------------------------------

variable "project_id" {
  description = "Google Cloud project that holds the whole pipeline."
  type        = string
}

variable "region" {
  description = "Region for every regional resource. The upload bucket is created in this region, so the function's Eventarc trigger (which must match the bucket location) uses it too."
  type        = string
  default     = "us-central1"
}

variable "name_prefix" {
  description = "Prefix of resource names (service accounts, function, network, instance group). Lower case letters, digits and dashes."
  type        = string
  default     = "inference"

  validation {
    condition     = can(regex("^[a-z][a-z0-9-]{1,18}[a-z0-9]$", var.name_prefix))
    error_message = "name_prefix must be 3-20 characters: lower case letters, digits and dashes, starting with a letter."
  }
}

variable "labels" {
  description = "Labels added to every resource that takes labels."
  type        = map(string)
  default     = {}
}

# --- Cloud Storage --------------------------------------------------------------------------

variable "upload_bucket_name" {
  description = "Name of the bucket users upload images to. Null: PROJECT_ID-uploads."
  type        = string
  default     = null
}

variable "upload_prefix" {
  description = "Only objects whose name starts with this become jobs (the function's UPLOAD_PREFIX). Empty string: every object."
  type        = string
  default     = "incoming/"
}

variable "upload_retention_days" {
  description = "Uploaded images are deleted this many days after upload (lifecycle rule); their rows in BigQuery stay."
  type        = number
  default     = 30

  validation {
    condition     = var.upload_retention_days >= 1
    error_message = "upload_retention_days must be at least 1."
  }
}

variable "noncurrent_version_retention_days" {
  description = "Overwritten or deleted object versions are kept this many days, so a job for an older generation can still be read."
  type        = number
  default     = 7
}

variable "models_bucket_name" {
  description = "Name of the bucket that holds model versions (gs://BUCKET/models/NAME/VERSION/). Null: PROJECT_ID-models."
  type        = string
  default     = null
}

variable "training_bucket_name" {
  description = "Name of the bucket that holds training datasets (gs://BUCKET/datasets/NAME/<class>/...) for Vertex AI jobs. Null: PROJECT_ID-training."
  type        = string
  default     = null
}

variable "training_submitters" {
  description = "Members allowed to submit training jobs (python -m modelkit cloud-train): roles/aiplatform.user on the project and actAs on the trainer service account only, e.g. [\"user:you@example.com\"]."
  type        = list(string)
  default     = []
}

variable "force_destroy_buckets" {
  description = "Let `terraform destroy` delete buckets that still hold objects. Keep false in production; set true for a throw-away project."
  type        = bool
  default     = false
}

# --- Cloud Function -------------------------------------------------------------------------

variable "max_event_age_s" {
  description = "The function drops events older than this (MAX_EVENT_AGE_S), so retries of ancient events stop. 0 disables."
  type        = number
  default     = 86400
}

variable "function_max_instances" {
  description = "Upper bound of function instances (each handles one event at a time)."
  type        = number
  default     = 100
}

variable "function_memory" {
  description = "Memory of one function instance."
  type        = string
  default     = "256M"
}

# --- Pub/Sub --------------------------------------------------------------------------------

variable "jobs_topic_name" {
  description = "Topic the function publishes one job per upload to."
  type        = string
  default     = "jobs"
}

variable "jobs_subscription_name" {
  description = "Pull subscription the workers read jobs from (the autoscaler watches its backlog)."
  type        = string
  default     = "jobs-worker"
}

variable "dead_letter_topic_name" {
  description = "Topic that receives jobs which failed max_delivery_attempts times."
  type        = string
  default     = "jobs-dead-letter"
}

variable "dead_letter_subscription_name" {
  description = "Subscription on the dead-letter topic that holds failed jobs for inspection and replay, so nothing is dropped."
  type        = string
  default     = "jobs-dead-letter-hold"
}

variable "ack_deadline_seconds" {
  description = "Ack deadline of the jobs subscription; the client library extends leases while a batch is in flight."
  type        = number
  default     = 60

  validation {
    condition     = var.ack_deadline_seconds >= 10 && var.ack_deadline_seconds <= 600
    error_message = "ack_deadline_seconds must be between 10 and 600."
  }
}

variable "max_delivery_attempts" {
  description = "Deliveries of one job before it goes to the dead-letter topic. Also passed to the worker (WORKER_MAX_DELIVERY_ATTEMPTS) so the last attempt writes an error row."
  type        = number
  default     = 5

  validation {
    condition     = var.max_delivery_attempts >= 5 && var.max_delivery_attempts <= 100
    error_message = "Pub/Sub accepts max_delivery_attempts between 5 and 100."
  }
}

variable "retry_minimum_backoff" {
  description = "Shortest wait before a nacked or expired job is redelivered."
  type        = string
  default     = "10s"
}

variable "retry_maximum_backoff" {
  description = "Longest wait before a nacked or expired job is redelivered."
  type        = string
  default     = "600s"
}

# --- BigQuery -------------------------------------------------------------------------------

variable "dataset_id" {
  description = "BigQuery dataset for the results and errors tables and the views in sql/views/."
  type        = string
  default     = "inference"
}

variable "dataset_location" {
  description = "BigQuery dataset location. Null: the region."
  type        = string
  default     = null
}

variable "table_deletion_protection" {
  description = "Refuse to delete the results and errors tables from Terraform. Set false before `terraform destroy`."
  type        = bool
  default     = true
}

variable "partition_expiration_days" {
  description = "Delete table partitions older than this many days. Null: keep forever."
  type        = number
  default     = null
}

# --- Artifact Registry and images -----------------------------------------------------------

variable "artifact_repository_id" {
  description = "Artifact Registry Docker repository for the worker, training and TF Serving images."
  type        = string
  default     = "inference"
}

variable "worker_image_name" {
  description = "Image (in the Artifact Registry repository) the instance group runs: worker-openvino or worker-tensorflow."
  type        = string
  default     = "worker-openvino"
}

variable "worker_image_tag" {
  description = "Tag of the worker image. Cloud Build passes the commit SHA it just pushed; for a first manual apply use a tag that exists."
  type        = string
}

# --- Worker settings (container environment) ------------------------------------------------

variable "worker_engine" {
  description = "WORKER_ENGINE: inference engine of the worker."
  type        = string
  default     = "openvino"
}

variable "worker_precision" {
  description = "WORKER_PRECISION: f32, bf16, f16 or default."
  type        = string
  default     = "f32"
}

variable "worker_batch_size" {
  description = "WORKER_BATCH_SIZE: images per inference call."
  type        = number
  default     = 32
}

variable "worker_model_dir" {
  description = "WORKER_MODEL_DIR: model version directory inside the image (the image bakes build/models/demo/1 in there)."
  type        = string
  default     = "/models/demo/1"
}

# --- Compute Engine -------------------------------------------------------------------------

variable "worker_machine_type" {
  description = "Machine type of a worker VM. e2-standard-2 is the cheapest 2-vCPU choice; n2-standard-2 guarantees AVX-512 for OpenVINO."
  type        = string
  default     = "e2-standard-2"
}

variable "worker_spot" {
  description = "Run workers on Spot VMs (much cheaper, may be preempted; a preempted worker's unacked jobs are redelivered)."
  type        = bool
  default     = false
}

variable "worker_boot_disk_gb" {
  description = "Boot disk size of a worker VM in GB (the image is pulled onto it)."
  type        = number
  default     = 20
}

variable "cos_image_family" {
  description = "Container-Optimized OS image family the workers boot."
  type        = string
  default     = "cos-stable"
}

variable "worker_subnet_cidr" {
  description = "IP range of the workers' subnet (VMs have no public address)."
  type        = string
  default     = "10.20.0.0/24"
}

variable "enable_cloud_nat" {
  description = "Add Cloud NAT so workers can reach the internet. Not needed for Google APIs or Artifact Registry (Private Google Access covers them)."
  type        = bool
  default     = false
}

variable "min_workers" {
  description = "Fewest worker VMs. 0 lets the group scale to zero when the subscription is empty (first job then waits for a VM to boot and load the model)."
  type        = number
  default     = 1
}

variable "max_workers" {
  description = "Most worker VMs."
  type        = number
  default     = 10
}

variable "messages_per_worker" {
  description = "Autoscaler single_instance_assignment: undelivered jobs one VM is expected to absorb. About worker throughput (images/s) x acceptable queueing delay (s)."
  type        = number
  default     = 1000
}

variable "cpu_target" {
  description = "Second autoscaling signal: average CPU utilization to keep (0-1]."
  type        = number
  default     = 0.75
}

variable "autoscaler_cooldown_s" {
  description = "Seconds a new VM needs before its metrics count (boot, image pull, model load and warm-up)."
  type        = number
  default     = 180
}

variable "enable_autohealing" {
  description = "Recreate workers whose GET /healthz on port 8080 fails: liveness of the worker's HTTP face (python -m worker serve, the image's default command). /readyz is not used here, so a BigQuery outage does not recreate VMs."
  type        = bool
  default     = true
}

variable "autohealing_initial_delay_s" {
  description = "Seconds after boot before health checks can fail a worker."
  type        = number
  default     = 300
}
