"""The model dimension of the report from `make bench-models`' JSON (bare engines per network):
one table per network, and speed-up against fidelity per engine and precision.

The bare-engine figures are not rows in BigQuery (no image went through the pipeline); the
worker's runs on the stack are, and sql/queries/by_model.sql groups those by model.
"""

from __future__ import annotations

import json
from pathlib import Path

from matplotlib.figure import Figure

from report.plots import COLOURS, to_svg

COLUMNS = ("engine", "precision", "runs_as", "batch", "p50_ms", "p95_ms", "p99_ms", "images_per_s", "images_per_s_range",
           "speedup_vs_tf_f32", "speedup_range", "cpu_ms_per_image", "cpu_speedup_vs_tf_f32", "top1_agreement", "max_abs_score_diff", "accuracy", "size_mb", "load_s",
           "peak_rss_mb")
MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*")


def load(path: Path | None) -> dict | None:
    """The JSON of one bench-models run, or None when there is none (the report does without)."""
    if path is None or not Path(path).is_file():
        return None
    return json.loads(Path(path).read_text())


def _range(spread: dict, digits: int) -> str:
    return f"{spread['min']:.{digits}f}-{spread['max']:.{digits}f}" if spread.get("median") is not None else ""


def network_rows(network: dict) -> list[list]:
    """Raw values per (configuration, batch size), in COLUMNS order."""
    rows = []
    for config in network["configs"]:
        f = config["fidelity"]
        for batch, b in sorted(config["batches"].items(), key=lambda item: int(item[0])):
            rows.append([config["engine"], config["precision"], config["effective_precision"], int(batch),
                         b["p50_ms"]["median"], b["p95_ms"]["median"], b["p99_ms"]["median"],
                         b["images_per_s"]["median"], _range(b["images_per_s"], 0),
                         b["speedup_vs_tensorflow_f32"]["median"], _range(b["speedup_vs_tensorflow_f32"], 2),
                         (b.get("cpu_ms_per_image") or {}).get("median"),
                         (b.get("cpu_speedup_vs_tensorflow_f32") or {}).get("median"),
                         f["top1_agreement"], f["max_abs_score_diff"], f["accuracy"],
                         config["model_size_bytes"] / 1e6, config["load_s"], config["peak_rss_bytes"] / 1e6])
    return rows


def tables(result: dict | None, source: str, format_value) -> list[dict]:
    """One report table per network (the shape report.build's template takes)."""
    if not result:
        return []
    machine = result["machine"]
    built = []
    for network in result["networks"]:
        weights = network.get("weights") or (f"trained briefly on the demo dataset (Keras held-out accuracy "
                   f"{network['keras_held_out_accuracy']:.3f})" if network["trained"]
                   else f"random weights, fidelity only ({network.get('not_trained_why') or 'not trained'})")
        summary = (f"{network['keras_application']} at {network['input_size']} px, "
                   f"{network['parameters'] / 1e6:.1f} M parameters, {weights}. Bare engines, one subprocess each, "
                   f"interleaved; medians over {result['options']['repeats']} repeats, range min-max. "
                   f"{machine['cpu_model']}, {machine['logical_cores']} logical cores, flags "
                   f"{','.join(machine['cpu_flags'])}. Fidelity on {network['held_out_images']} held-out images "
                   "against TensorFlow f32.")
        built.append({"name": f"bench_models_{network['network']}", "title": f"Network {network['network']}",
                      "source": source, "summary": summary, "columns": list(COLUMNS),
                      "cells": [[format_value(v) for v in row] for row in network_rows(network)],
                      "collapsed": False, "error": None, "message": None})
    return built


def speedup_against_fidelity(result: dict | None, batch_size: int | None = None) -> str | None:
    """Speed-up over TensorFlow f32 (x) against top-1 disagreement with it (y), one colour per
    engine and precision, one marker per network, at one batch size (default: the largest run)."""
    if not result or not result.get("networks"):
        return None
    sizes = result["options"]["batch_sizes"]
    batch = str(batch_size or max(sizes))
    figure = Figure(figsize=(9, 5.5))
    axis = figure.add_subplot()
    labels = sorted({f"{c['engine']} {c['precision']}" for n in result["networks"] for c in n["configs"]})
    colours = {label: COLOURS[i % len(COLOURS)] for i, label in enumerate(labels)}
    for index, network in enumerate(result["networks"]):
        marker = MARKERS[index % len(MARKERS)]
        for config in network["configs"]:
            b = config["batches"].get(batch)
            if b is None:
                continue
            label = f"{config['engine']} {config['precision']}"
            speedup = b["speedup_vs_tensorflow_f32"]
            x = speedup["median"]
            y = 100.0 * (1.0 - config["fidelity"]["top1_agreement"])
            axis.errorbar(x, y, xerr=[[x - speedup["min"]], [speedup["max"] - x]], fmt=marker, color=colours[label],
                          markersize=7, capsize=2)
    for label in labels:
        axis.plot([], [], "o", color=colours[label], label=label)
    for index, network in enumerate(result["networks"]):
        axis.plot([], [], MARKERS[index % len(MARKERS)], color="#444", label=network["network"])
    axis.axvline(1.0, color="#aaa", linewidth=0.8)
    axis.set_xscale("log")
    axis.set_xlabel(f"speed-up over TensorFlow f32 (images/s ratio, batch {batch}; bars: range over repeats)")
    axis.set_ylabel("top-1 disagreement with TensorFlow f32 (% of held-out images)")
    axis.set_title(f"Speed-up against fidelity, flags {','.join(result['machine']['cpu_flags'])}")
    axis.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    axis.grid(True, which="both", alpha=0.3)
    return to_svg(figure)
