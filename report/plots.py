"""The report's plots, drawn from query rows with matplotlib and returned as SVG text.

Figures are built with `matplotlib.figure.Figure` (no pyplot, no global backend): SVG needs no
display, and the text is embedded in the HTML, so the report opens without network access.
"""

from __future__ import annotations

import io

from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

# Stages an image meets, in order: (column of stage_breakdown.sql, legend label).
STAGES = (
    ("mean_created_to_function_ms", "upload -> function"),
    ("mean_function_to_worker_ms", "function -> worker"),
    ("mean_queue_ms", "queue in worker"),
    ("mean_download_ms", "download"),
    ("mean_preprocess_ms", "decode + preprocess"),
    ("mean_batch_wait_ms", "wait for batch"),
    ("mean_batch_inference_ms", "inference (batch call)"),
    ("mean_unaccounted_ms", "other"),
    ("mean_sink_ms", "BigQuery insert"),
)

COLOURS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f",
           "#bcbd22", "#17becf")


def group_label(row: dict) -> str:
    """engine and precision, the grouping every per-engine query uses."""
    return " ".join(str(part) for part in (row.get("engine"), row.get("precision")) if part)


def colour_map(labels: list[str]) -> dict[str, str]:
    return {label: COLOURS[index % len(COLOURS)] for index, label in enumerate(sorted(set(labels)))}


def to_svg(figure: Figure) -> str:
    buffer = io.StringIO()
    figure.savefig(buffer, format="svg", metadata={"Date": None}, bbox_inches="tight")
    return buffer.getvalue()


def latency_distribution(rows: list[dict]) -> str | None:
    """Per engine: percentile curves (top) and box plots (bottom) of inference and total time."""
    panels = (("inference_ms_percentiles", "inference per image (ms)"),
              ("total_ms_percentiles", "worker total per image (ms)"))
    groups = [row for row in rows if any(row.get(column) for column, _ in panels)]
    if not groups:
        return None
    colours = colour_map([group_label(row) for row in groups])
    figure = Figure(figsize=(11, 3.2 + 0.45 * len(groups)), layout="constrained")
    axes = figure.subplots(2, 2, height_ratios=(3, max(1.2, 0.5 * len(groups))))
    for column_index, (column, title) in enumerate(panels):
        curve, boxes = axes[0][column_index], axes[1][column_index]
        stats, box_colours, extremes = [], [], []
        for row in groups:
            values = [v for v in (row.get(column) or []) if v is not None]
            if len(values) < 2:
                continue
            label = group_label(row)
            percentiles = [100 * i / (len(values) - 1) for i in range(len(values))]
            curve.step(values, percentiles, where="post", color=colours[label], linewidth=2,
                       label=f"{label} ({row['images']} images)")
            stats.append({"label": label, "med": _at(values, 50), "q1": _at(values, 25), "q3": _at(values, 75),
                          "whislo": _at(values, 1), "whishi": _at(values, 99), "fliers": []})
            box_colours.append(colours[label])
            extremes += [values[0], values[-1]]
        curve.set_title(f"{title}: percentiles", fontsize=11)
        curve.set_ylabel("percentile")
        curve.set_ylim(0, 100)
        curve.grid(True, alpha=0.3)
        if stats:
            _log_if_wide(curve, extremes)
            curve.legend(fontsize=8, loc="lower right")
            drawn = boxes.bxp(stats, orientation="horizontal", patch_artist=True, widths=0.6)
            for patch, colour in zip(drawn["boxes"], box_colours):
                patch.set_facecolor(colour)
                patch.set_alpha(0.75)
            if curve.get_xscale() == "log":
                _plain_log_scale(boxes)
            boxes.set_xlim(curve.get_xlim())
        boxes.set_xlabel(f"{title}; box p25-p75, whiskers p1-p99")
        boxes.grid(True, axis="x", alpha=0.3)
    return to_svg(figure)


def stage_breakdown(rows: list[dict]) -> str | None:
    """One stacked bar per engine: mean time per image in each stage, in the order it happens."""
    groups = [row for row in rows if row.get("images")]
    if not groups:
        return None
    figure = Figure(figsize=(11, 1.6 + 0.7 * len(groups)), layout="constrained")
    axis = figure.subplots()
    labels = [group_label(row) for row in groups]
    left = [0.0] * len(groups)
    for index, (column, name) in enumerate(STAGES):
        widths = [max(0.0, row.get(column) or 0.0) for row in groups]
        if not any(widths):
            continue
        axis.barh(labels, widths, left=left, color=COLOURS[index % len(COLOURS)], label=name, height=0.6)
        left = [a + b for a, b in zip(left, widths)]
    for y, (row, end) in enumerate(zip(groups, left)):
        axis.text(end, y, f"  {end:,.0f} ms", va="center", fontsize=9)
    axis.invert_yaxis()
    axis.set_xlim(0, max(left) * 1.15 or 1)
    axis.set_xlabel("mean ms per image (sink = the batch's BigQuery insert, after the worker total)")
    axis.set_title("Where the time goes, per engine", fontsize=11)
    axis.legend(fontsize=8, ncols=5, loc="upper center", bbox_to_anchor=(0.5, -0.35 if len(groups) < 3 else -0.15))
    axis.grid(True, axis="x", alpha=0.3)
    return to_svg(figure)


def throughput_over_time(rows: list[dict], bucket_s: int, max_lines: int = 12) -> str | None:
    """Images per second per run and engine, bucket by bucket from the run's first bucket (gaps = 0)."""
    if not rows:
        return None
    series: dict[tuple[str, str], dict[int, float]] = {}
    for row in rows:
        key = (group_label(row), row["run_id"] or "(none)")
        series.setdefault(key, {})[int(row["seconds_from_first"])] = row["images_per_s"]
    busiest = sorted(series, key=lambda key: -sum(series[key].values()))[:max_lines]
    colours = colour_map([label for label, _ in busiest])
    styles = ("-", "--", ":", "-.")
    figure = Figure(figsize=(11, 3.8), layout="constrained")
    axis = figure.subplots()
    runs_seen: dict[str, int] = {}
    for label, run_id in sorted(busiest):
        points = series[label, run_id]
        xs = list(range(0, max(points) + bucket_s, bucket_s))
        ys = [points.get(x, 0.0) for x in xs]
        xs, ys = xs + [xs[-1] + bucket_s], ys + [ys[-1]]  # the last bucket has a width too
        style = styles[runs_seen.setdefault(label, 0) % len(styles)]
        runs_seen[label] += 1
        axis.step(xs, ys, where="post", color=colours[label], linestyle=style, linewidth=2,
                  label=f"{label} · {run_id} (peak {max(ys):,.1f}/s)")
    axis.set_xlabel(f"seconds since the run's first row ({bucket_s}-s buckets)")
    axis.set_ylabel("images per second")
    axis.set_ylim(bottom=0)
    title = "Throughput over time (rows built per bucket)"
    if len(series) > len(busiest):
        title += f": the {len(busiest)} busiest of {len(series)} runs"
    axis.set_title(title, fontsize=11)
    axis.grid(True, alpha=0.3)
    axis.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    return to_svg(figure)


def _at(percentiles: list[float], percent: int) -> float:
    return percentiles[round(percent * (len(percentiles) - 1) / 100)]


def _log_if_wide(axis, values: list[float]) -> None:
    positive = [v for v in values if v and v > 0]
    if positive and max(positive) / min(positive) > 20:
        _plain_log_scale(axis)
    low, high = (min(positive), max(positive)) if positive else (0, 1)
    if axis.get_xscale() == "log":
        axis.set_xlim(low / 1.5, high * 1.5)
    else:
        pad = (high - low) * 0.08 or max(high * 0.1, 1)
        axis.set_xlim(max(0, low - pad), high + pad)


def _plain_log_scale(axis) -> None:
    """A log x axis labelled 1, 2, 5, 10, 20, ... rather than overlapping powers of ten."""
    axis.set_xscale("log")
    axis.xaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    axis.xaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))
    axis.xaxis.set_minor_formatter(NullFormatter())
