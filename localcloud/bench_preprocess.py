"""`make bench-preprocess`: what the one preprocessing function costs per image, by spec.

A 1024x768 photo (scikit-image's astronaut, resized; a real photo compresses and decodes like
one, noise does not) as JPEG and as PNG goes through `modelspec.preprocess.preprocess_image` with
the demo CNN's spec and with 224x224x3 specs as ImageNet networks take them (stretch, shorter side
256 then centre crop 224 with mean/std, letterbox). JPEG decodes at reduced size (DCT scaling)
when the source has at least twice the pixels kept per side; the PNG rows show the full decode.
Each configuration is timed `--repeats` times after a warm-up, interleaved, and reported as
median, p95 and spread; the engine call of the demo model (batch 1) is timed alongside, since
preprocessing should never cost more than the call it feeds. Writes JSON under build/bench/.
"""

from __future__ import annotations

import io
import json
import statistics
import time
from pathlib import Path

import click
import numpy as np
from PIL import Image
from rich.console import Console
from rich.progress import track
from rich.table import Table

from modelspec.preprocess import preprocess_image
from modelspec.spec import InputSpec, ModelSpec, OutputSpec, PreprocessSpec, demo_spec
from worker.sysinfo import cpu_isa_flags, machine_facts

IMAGENET = dict(scale=1 / 255, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))


def specs() -> dict[str, ModelSpec]:
    def rgb224(**preprocess) -> ModelSpec:
        return ModelSpec(InputSpec(name="x", height=224, width=224, channels=3, color="rgb"),
                         PreprocessSpec(**preprocess),
                         OutputSpec(name="y", activation="softmax", class_names=("a", "b"))).validated()

    return {
        "demo 128x128x1 stretch": demo_spec(),
        "224x224x3 stretch [-1,1]": rgb224(scale=1 / 127.5, offset=-1.0),
        "224x224x3 shorter 256 + crop, ImageNet mean/std": rgb224(resize="shorter_side_crop", resize_shorter_to=256,
                                                                  **IMAGENET),
        "224x224x3 letterbox": rgb224(resize="letterbox", letterbox_fill=114),
    }


def photo(width: int = 1024, height: int = 768) -> Image.Image:
    from skimage import data

    return Image.fromarray(data.astronaut()).resize((width, height), Image.Resampling.LANCZOS)


def encoded(image: Image.Image) -> dict[str, bytes]:
    out = {}
    for fmt, options in (("JPEG", {"quality": 90}), ("PNG", {})):
        buffer = io.BytesIO()
        image.save(buffer, fmt, **options)
        out[fmt] = buffer.getvalue()
    return out


def measure(repeats: int, warmup: int = 5) -> dict:
    files = encoded(photo())
    cases = [(name, fmt, spec) for name, spec in specs().items() for fmt in files]
    timings: dict[tuple[str, str], list[float]] = {(name, fmt): [] for name, fmt, _ in cases}
    for name, fmt, spec in cases:
        for _ in range(warmup):
            preprocess_image(files[fmt], spec)
    for _ in track(range(repeats), description="preprocessing", transient=True):
        for name, fmt, spec in cases:  # interleaved: machine noise hits every case alike
            started = time.perf_counter()
            preprocess_image(files[fmt], spec)
            timings[(name, fmt)].append((time.perf_counter() - started) * 1000.0)
    return {
        "machine": {**machine_facts().as_row(), "cpu_flags": cpu_isa_flags()},
        "source": {"size": "1024x768", "jpeg_bytes": len(files["JPEG"]), "png_bytes": len(files["PNG"])},
        "repeats": repeats,
        "rows": [{"spec": name, "format": fmt, **summary(values)} for (name, fmt), values in timings.items()],
        "engine_call_ms": engine_call(repeats),
    }


def engine_call(repeats: int) -> dict | None:
    """The demo model's OpenVINO f32 call on one image, for scale (None without a built model)."""
    model_dir = Path("build/models/demo/1")
    if not (model_dir / "manifest.json").is_file():
        return None
    from modelspec.manifest import verify_manifest
    from worker.engines import create_engine
    from worker.engines.base import warmup_batch

    engine = create_engine("openvino", "f32", model_dir, verify_manifest(model_dir))
    engine.load()
    engine.warmup()
    one = warmup_batch(1)
    values = []
    for _ in range(repeats):
        started = time.perf_counter()
        engine.infer(one)
        values.append((time.perf_counter() - started) * 1000.0)
    return summary(values)


def summary(values: list[float]) -> dict:
    ordered = sorted(values)
    return {"median_ms": statistics.median(ordered), "p95_ms": ordered[int(0.95 * (len(ordered) - 1))],
            "min_ms": ordered[0], "max_ms": ordered[-1]}


@click.command()
@click.option("--repeats", default=50, show_default=True, help="timed runs per configuration")
@click.option("--out", "out_dir", default="build/bench", show_default=True, type=click.Path(path_type=Path))
def main(repeats: int, out_dir: Path) -> None:
    """Preprocessing cost per image by spec and format (1024x768 photo in)."""
    result = measure(repeats)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "preprocess.json"
    path.write_text(json.dumps(result, indent=2))
    table = Table(title=f"preprocess_image, 1024x768 photo in ({repeats} runs each, interleaved)")
    for column in ("spec", "format", "median ms", "p95 ms", "min..max ms"):
        table.add_column(column, justify="left" if column in ("spec", "format") else "right")
    for row in result["rows"]:
        table.add_row(row["spec"], row["format"], f"{row['median_ms']:.2f}", f"{row['p95_ms']:.2f}",
                      f"{row['min_ms']:.2f}..{row['max_ms']:.2f}")
    console = Console()
    console.print(table)
    call = result["engine_call_ms"]
    if call:
        console.print(f"demo model engine call (OpenVINO f32, batch 1): median {call['median_ms']:.2f} ms, "
                      f"p95 {call['p95_ms']:.2f} ms")
    console.print(f"CPU {result['machine'].get('cpu_model')}; flags {' '.join(result['machine']['cpu_flags'])}; "
                  f"JSON: {path}")


if __name__ == "__main__":
    main()
