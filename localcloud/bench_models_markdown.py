"""The tables of one `make bench-models` JSON as Markdown, so the README and docs/bench-models.md
quote a run instead of being typed from it:

    python -m localcloud.bench_models markdown build/bench-models/latest.json > /tmp/tables.md

Three tables: every network x configuration x batch size (docs), the seeds' form (latency reduction
at batch 1, speed-up at the largest batch, fidelity and accuracy change per network and precision),
and the worker on the local stack next to the bare engine.
"""

from __future__ import annotations

from typing import Any


def _num(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _median(stats: dict | None, digits: int = 1, scale: float = 1.0) -> str:
    if not stats or stats.get("median") is None:
        return "-"
    return f"{stats['median'] * scale:.{digits}f}"


def _range(stats: dict | None, digits: int = 1, scale: float = 1.0) -> str:
    if not stats or stats.get("median") is None:
        return "-"
    return (f"{stats['median'] * scale:.{digits}f} ({stats['min'] * scale:.{digits}f}-"
            f"{stats['max'] * scale:.{digits}f})")


def _score(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:.2g}" if value < 0.01 else f"{value:.3f}"


def runs_as(config: dict) -> str:
    effective = config.get("effective_precision") or config["precision"]
    return effective if effective == config["precision"] else f"{config['precision']} (runs as {effective})"


def full_table(result: dict) -> str:
    """Every network x configuration x batch size: the docs' table."""
    lines = ["| network | engine | precision | batch | p50 ms | p95 ms | p99 ms | img/s (range) | x TF f32 | "
             "CPU ms/img | x TF f32 (CPU) | size MB | load s | peak RSS MB |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for network in result["networks"]:
        for config in network["configs"]:
            for batch, row in config["batches"].items():
                lines.append(
                    f"| {network['network']} | {config['engine']} | {runs_as(config)} | {batch} | "
                    f"{_median(row['p50_ms'])} | {_median(row['p95_ms'])} | {_median(row['p99_ms'])} | "
                    f"{_range(row['images_per_s'])} | {_median(row['speedup_vs_tensorflow_f32'], 2)} | "
                    f"{_median(row.get('cpu_ms_per_image'))} | {_median(row.get('cpu_speedup_vs_tensorflow_f32'), 2)} | "
                    f"{config['model_size_bytes'] / 1e6:.1f} | {config['load_s']:.1f} | "
                    f"{config['peak_rss_bytes'] / 1e6:.0f} |")
        for key, why in (network.get("left_out") or {}).items():
            lines.append(f"| {network['network']} | {key} | left out: {' '.join(str(why).split())[:200]} "
                         "| | | | | | | | | | | |")
    return "\n".join(lines)


def _weights(network: dict) -> str:
    mode = network.get("training_mode") or ("full" if network["trained"] else "none")
    accuracy = f"acc {network['keras_held_out_accuracy']:.3f}"
    return {"full": f"trained ({accuracy})", "head": f"head fitted ({accuracy})"}.get(mode, "random")


def seeds_table(result: dict) -> str:
    """Per network and configuration, in the seeds' form: latency reduction at batch 1 and the
    throughput speed-up at the largest batch against TensorFlow f32, fidelity, accuracy change."""
    sizes = sorted({int(b) for n in result["networks"] for c in n["configs"] for b in c["batches"]})
    small, large = str(sizes[0]), str(sizes[-1])
    lines = [f"| network | weights | engine precision | b={small} p50 ms (TF f32) | latency reduction b={small} (range) | "
             f"speed-up b={large} img/s (range) | speed-up b={large} CPU | top-1 agreement | max abs d score | "
             "accuracy change |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for network in result["networks"]:
        reference = next((c for c in network["configs"] if (c["engine"], c["precision"]) == ("tensorflow", "f32")), None)
        ref_p50 = reference["batches"].get(small, {}).get("p50_ms") if reference else None
        ref_accuracy = (reference or {}).get("fidelity", {}).get("accuracy")
        for config in network["configs"]:
            if config is reference:
                continue
            one, many = config["batches"].get(small, {}), config["batches"].get(large, {})
            fidelity = config.get("fidelity") or {}
            accuracy = fidelity.get("accuracy")
            change = (f"{(accuracy - ref_accuracy) * 100:+.1f} pp"
                      if accuracy is not None and ref_accuracy is not None else "n/a")
            reduction = one.get("latency_reduction_vs_tensorflow_f32")
            cut = (f"{reduction['median'] * 100:.0f}% ({reduction['min'] * 100:.0f} to {reduction['max'] * 100:.0f}%)"
                   if reduction and reduction.get("median") is not None else "-")
            lines.append(
                f"| {network['network']} | {_weights(network)} | {config['engine']} {runs_as(config)} | "
                f"{_median(one.get('p50_ms'))} ({_median(ref_p50)}) | {cut} | "
                f"{_range(many.get('speedup_vs_tensorflow_f32'), 2)} | {_median(many.get('cpu_speedup_vs_tensorflow_f32'), 2)} | "
                f"{_num(fidelity.get('top1_agreement'), 3)} | {_score(fidelity.get('max_abs_score_diff'))} | {change} |")
        for key, why in (network.get("left_out") or {}).items():
            lines.append(f"| {network['network']} | {_weights(network)} | {key} | left out: "
                         f"{' '.join(str(why).split())[:160]} | | | | | | |")
    return "\n".join(lines)


def stack_table(result: dict) -> str:
    """The worker on the local stack next to the bare engine at the same batch size."""
    lines = ["| network | engine precision | batch | images | worker img/s | bare img/s (matrix) | worker / bare | "
             "worker CPU ms/img | bare CPU ms/img | worker / bare (CPU) | emulators CPU ms/img | A/B | "
             "$/M e2-standard-2 | $/M e2-standard-4 |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for row in result.get("stack") or []:
        cost: dict[str, Any] = row.get("cost_per_million_usd") or {}
        lines.append(
            f"| {row['network']} | {row['engine']} {row['precision']} | {row['batch_size']} | {row['images']} | "
            f"{_num(row['worker_images_per_s'])} | {_num(row.get('bare_images_per_s_matrix'))} | "
            f"{_num(row.get('worker_vs_bare_throughput'), 2)} | {_num(row.get('worker_cpu_ms_per_image'))} | "
            f"{_num(row.get('bare_cpu_ms_per_image_matrix'))} | {_num(row.get('worker_vs_bare_cpu'), 2)} | "
            f"{_num(row.get('emulators_cpu_ms_per_image'))} | {_num(row.get('worker_vs_bare_ab_ratio'), 2)} | "
            f"${_num(cost.get('e2-standard-2'), 2)} | ${_num(cost.get('e2-standard-4'), 2)} |")
    return "\n".join(lines)


def render(result: dict, source: str) -> str:
    machine = result["machine"]
    load = ", ".join(f"{n['network']} {n['load_avg_1m']['before_timing']:.1f}-{n['load_avg_1m']['after_timing']:.1f}"
                     for n in result["networks"] if n.get("load_avg_1m"))
    header = (f"Run `{source}`, started {result['started_at']}. {machine['cpu_model']}, "
              f"{machine['logical_cores']} logical cores, CPU flags `{','.join(machine['cpu_flags'])}`. "
              f"1-minute load average before-after each network's timing: {load}.")
    return "\n\n".join([header, "### Against the seeds, in their form", seeds_table(result),
                        "### The worker on the local stack", stack_table(result),
                        "### Every configuration", full_table(result)]) + "\n"
