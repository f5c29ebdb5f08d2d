"""The autoscaling simulation (localcloud/autoscale_sim.py): its queueing against closed forms,
the autoscaler's rules it models, and the Terraform settings it reads."""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import pytest
from click.testing import CliRunner

from localcloud import autoscale_sim as sim

FIXED = sim.AutoscalerPolicy(min_workers=4, max_workers=4, messages_per_worker=1000, cpu_target=0.75,
                             cooldown_s=0, machine_type="e2-standard-2")


def fixed_pool(n: int, rate: float, base_latency_s: float = 0.0) -> sim.SimParams:
    """n warm VMs, never more nor fewer: a plain n-server queue."""
    return sim.SimParams(policy=replace(FIXED, min_workers=n, max_workers=n), rate_per_vm=rate, startup_s=0.0,
                         base_latency_s=base_latency_s)


@pytest.mark.parametrize("n, rate, images", [(1, 90.0, 16_000), (4, 90.0, 16_000), (3, 57.5, 100_000)])
def test_a_burst_on_a_fixed_pool_drains_in_b_over_n_mu_with_linear_latencies(n, rate, images):
    # Closed form: B images at t = 0 leave at N*mu per second, so the last one after B/(N mu) and
    # the image at quantile q after q*B/(N mu). The simulation lets the burst arrive over its first
    # second and counts whole seconds: within 1 s.
    base = 0.7
    result = sim.simulate(sim.burst("b", images), fixed_pool(n, rate, base_latency_s=base))
    drain = images / (n * rate)
    assert result.drain_s == pytest.approx(drain, abs=1.0)
    for q, value in ((0.50, result.p50_s), (0.95, result.p95_s), (0.99, result.p99_s)):
        assert value == pytest.approx(q * drain + base, abs=1.0)
    assert result.peak_vms == n
    assert result.vm_hours == pytest.approx(n * drain / 3600, abs=n * 2 / 3600)
    assert result.vm_cost == pytest.approx(result.vm_hours * sim.VM_PRICE_PER_HOUR["e2-standard-2"])
    assert result.images == pytest.approx(images)


def test_a_load_below_capacity_never_waits():
    result = sim.simulate(sim.steady("s", 80.0, 600), fixed_pool(1, 90.0, base_latency_s=1.5))
    assert (result.p50_s, result.p99_s) == (pytest.approx(1.5), pytest.approx(1.5))
    assert result.after_arrivals_s < 1.0


def test_a_load_above_capacity_grows_the_queue_at_lambda_minus_mu():
    # 100/s into one VM at 90/s for 600 s: the backlog grows by 10 a second, so the last upload
    # waits 6000 / 90 s and everything is done that long after it.
    result = sim.simulate(sim.steady("s", 100.0, 600), fixed_pool(1, 90.0))
    assert result.after_arrivals_s == pytest.approx(600 * 10 / 90, abs=1.0)
    assert result.timeline["backlog"][599] == pytest.approx(6000, rel=1e-6)


def test_fifo_waits_are_the_gaps_between_the_cumulative_curves():
    arrived = np.array([0.0, 10.0, 10.0, 10.0])
    served = np.array([0.0, 0.0, 5.0, 10.0])  # nothing in second 0, then 5 a second
    # Image k (0..10) arrives at k/10 s and leaves at 1 + k/5 s: it waits 1 + k/10 s.
    waits = sim.fifo_waits(arrived, served, points=1000)
    assert waits.min() == pytest.approx(1.0, abs=0.01) and waits.max() == pytest.approx(2.0, abs=0.01)
    assert np.median(waits) == pytest.approx(1.5, abs=0.01)


def test_the_backlog_signal_acts_only_once_its_sample_is_visible():
    # CPU target 1.0: one busy VM asks for one VM, so only the backlog metric can scale out. The
    # first sample after the burst is taken at 60 s and visible 120 s later.
    policy = replace(FIXED, min_workers=1, max_workers=10, cpu_target=1.0, cooldown_s=180)
    params = sim.SimParams(policy=policy, rate_per_vm=90.0, startup_s=90.0, metric_delay_s=120)
    vms = sim.simulate(sim.burst("b", 200_000), params).timeline["vms"]
    assert vms[179] == 1 and vms[180] == 10
    serving = sim.simulate(sim.burst("b", 200_000), params).timeline["serving"]
    assert serving[180 + 89] == 1 and serving[180 + 90] == 10  # the new VMs serve after start-up
    later = sim.simulate(sim.burst("b", 200_000), replace(params, metric_delay_s=240)).timeline["vms"]
    assert later[299] == 1 and later[300] == 10


def test_scale_in_waits_for_the_stabilization_period_then_one_vm_per_window():
    policy = replace(FIXED, min_workers=1, max_workers=5, cpu_target=1.0, scale_in_max_vms=1, scale_in_window_s=300)
    result = sim.simulate(sim.burst("b", 200_000), sim.SimParams(policy=policy, rate_per_vm=90.0, startup_s=60.0))
    vms = result.timeline["vms"]
    peak_until = int(np.nonzero(vms == 5)[0][-1])
    steps = np.nonzero(np.diff(vms) < 0)[0]
    assert all(np.diff(vms)[steps] == -1), "the scale-in control removes one VM at a time"
    assert np.all(np.diff(steps) >= 300)
    # The last sample with a backlog was taken before the queue drained; 10 minutes of
    # recommendations after it become visible keep the peak.
    drained = int(np.nonzero(result.timeline["backlog"] <= 1e-6)[0][0])
    assert peak_until >= drained + sim.AutoscalerPolicy().stabilization_s - 60
    assert vms[-1] == 1


def test_the_cpu_signal_sizes_the_group_for_a_load_the_backlog_signal_misses():
    # 100/s into 90/s VMs: the backlog peaks near 1200 (a sample of it asks for 2 VMs once, late),
    # so CPU does the sizing. One saturated VM asks for ceil(1 / 0.75) = 2; VMs busy draining the short backlog ask for more
    # for a while; in the steady state 2 VMs run at 100/180 = 56 % and ceil(2 x 0.56 / 0.75) = 2.
    policy = replace(FIXED, min_workers=1, max_workers=10, cpu_target=0.75, cooldown_s=0)
    result = sim.simulate(sim.steady("s", 100.0, 3600), sim.SimParams(policy=policy, rate_per_vm=90.0, startup_s=60))
    assert result.peak_vms >= 2
    assert result.timeline["vms"][3599] == 2
    assert result.timeline["backlog"][1800:3600].max() < 1.0


def test_day_shaped_load_sums_to_its_daily_total_and_peaks_at_twice_the_mean():
    workload = sim.day_shaped("d", 1_000_000)
    assert workload.total == pytest.approx(1_000_000, rel=1e-9)
    assert workload.arrivals.max() == pytest.approx(2 * 1_000_000 / sim.DAY_S, rel=1e-6)


VARIABLES_TF = """
variable "min_workers" {
  type    = number
  default = 2
}
variable "max_workers" {
  default = 7
}
variable "messages_per_worker" {
  default = 250
}
variable "cpu_target" {
  default = 0.6
}
variable "autoscaler_cooldown_s" {
  default = 240
}
variable "worker_machine_type" {
  default = "e2-standard-4"
}
variable "project_id" {
  type = string
}
"""

WORKER_TF = """
resource "google_compute_instance_template" "worker" {
  machine_type = var.worker_machine_type
}
resource "google_compute_region_autoscaler" "workers" {
  autoscaling_policy {
    min_replicas    = var.min_workers
    max_replicas    = var.max_workers
    cooldown_period = var.autoscaler_cooldown_s
    metric {
      name                       = "pubsub.googleapis.com/subscription/num_undelivered_messages"
      single_instance_assignment = var.messages_per_worker
    }
    cpu_utilization {
      target = var.cpu_target
    }
    scale_in_control {
      time_window_sec = 600
      max_scaled_in_replicas {
        fixed = 2
      }
    }
  }
}
"""


def test_the_policy_is_read_from_the_resource_and_the_variables_defaults():
    policy = sim.policy_from_terraform(VARIABLES_TF, WORKER_TF)
    assert policy == sim.AutoscalerPolicy(min_workers=2, max_workers=7, messages_per_worker=250.0, cpu_target=0.6,
                                          cooldown_s=240.0, machine_type="e2-standard-4", scale_in_max_vms=2,
                                          scale_in_window_s=600.0)


def test_a_variable_without_default_is_named():
    with pytest.raises(sim.TerraformError, match="min_workers"):
        sim.policy_from_terraform(VARIABLES_TF.replace("default = 2\n", "\n"), WORKER_TF)


def test_the_real_infra_defaults_are_the_ones_simulated():
    defaults = sim.variable_defaults((sim.INFRA_DIR / "variables.tf").read_text())
    policy = sim.load_policy()
    assert policy.min_workers == defaults["min_workers"] and policy.max_workers == defaults["max_workers"]
    assert policy.messages_per_worker == defaults["messages_per_worker"]
    assert policy.cpu_target == defaults["cpu_target"] and policy.cooldown_s == defaults["autoscaler_cooldown_s"]
    assert policy.machine_type == defaults["worker_machine_type"]
    assert policy.machine_type in sim.VM_PRICE_PER_HOUR


def test_the_command_prints_the_four_workloads():
    result = CliRunner().invoke(sim.main, [], terminal_width=200)
    assert result.exit_code == 0, result.output
    for name in ("16,000", "100 images/s", "1,000,000 images/day", "burst: 1,000,000"):
        assert name in result.output
    assert "SIMULATION" in result.output and "not a measurement" in result.output


def test_more_vms_never_drain_a_burst_slower():
    params = sim.SimParams(rate_per_vm=90.0, startup_s=90.0)
    times = [sim.simulate(sim.burst("b", 300_000), replace(params, policy=replace(params.policy, max_workers=n))).drain_s
             for n in (2, 5, 10)]
    assert times == sorted(times, reverse=True)
    assert not math.isnan(times[-1])
