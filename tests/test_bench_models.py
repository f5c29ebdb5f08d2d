"""The zoo (modelkit.zoo) and make bench-models (localcloud.bench_models), on the zoo's tiny
network (a 2-layer CNN at 32x32): the seeds' networks take minutes each and live in the bench.
No timed asserts: the numbers themselves are the bench's."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from localcloud import bench_models as bm
from localcloud.prices import FIXED_COST_PER_MILLION, VM_PRICE_PER_HOUR, cost_per_million
from modelkit import zoo

REPO = Path(__file__).resolve().parents[1]
DATASET = REPO / "build" / "demo-dataset"


# --- Pure parts -------------------------------------------------------------------------------------

def test_cost_per_million_is_the_readme_cost_table():
    # README "What it costs": e2-standard-2 at T = 100 images/s -> $7.98, e2-standard-4 at T = 25 -> $9.31.
    assert cost_per_million(100, VM_PRICE_PER_HOUR["e2-standard-2"]) == pytest.approx(7.98, abs=0.005)
    assert cost_per_million(25, VM_PRICE_PER_HOUR["e2-standard-4"]) == pytest.approx(9.31, abs=0.005)


def test_configs_always_start_with_the_tensorflow_f32_reference_and_refuse_what_no_engine_runs():
    configs = bm.parse_configs("openvino:int8,onnxruntime")
    assert [c.key for c in configs] == ["tensorflow:f32", "openvino:int8", "onnxruntime:f32"]
    assert [c.model_version for c in configs] == ["keras", "keras", "onnx"]
    import click

    with pytest.raises(click.BadParameter, match="'tensorflow:int8'"):
        bm.parse_configs("tensorflow:int8")


def test_spread_and_call_stats():
    assert bm.spread([3.0, 1.0, 2.0]) == {"median": 2.0, "min": 1.0, "max": 3.0, "n": 3}
    assert bm.spread([])["median"] is None
    stats = bm.call_stats([10.0, 10.0, 20.0, 10.0], batch_size=8, cpu_ms=[16.0, 16.0, 40.0, 16.0])
    assert stats["cpu_ms_per_image"] == 2.0
    assert "cpu_ms_per_image" not in bm.call_stats([1.0], batch_size=1)
    assert stats["p50_ms"] == 10.0 and stats["p50_ms"] <= stats["p95_ms"] <= stats["p99_ms"] <= 20.0
    assert stats["images_per_s"] == pytest.approx(32 / 0.05)


def test_fidelity_compares_softmax_scores_and_counts_top1_agreement():
    from modelspec.spec import OutputSpec

    spec = OutputSpec(name="logits", activation="softmax", class_names=("grass", "moon"))
    reference = np.array([[2.0, 0.0], [0.0, 2.0], [1.0, 0.0], [0.0, 1.0]], dtype=np.float32)
    ours = reference.copy()
    ours[2] = [0.0, 1.0]  # one flipped decision
    row = bm.fidelity(ours, reference, np.array([0, 1, 0, 0]), spec)
    assert row["top1_agreement"] == 0.75 and row["accuracy"] == 0.5 and row["images"] == 4
    flipped = 1 / (1 + np.exp(-1.0))
    assert row["max_abs_score_diff"] == pytest.approx(2 * flipped - 1, rel=1e-6)
    assert bm.fidelity(reference, reference, None, spec)["accuracy"] is None


def test_the_split_keeps_held_out_images_apart_and_is_seeded():
    split = zoo.split_dataset(DATASET, seed=0)
    held, rest = {p for p, _ in split["held_out"]}, {p for p, _ in split["rest"]}
    assert len(held) == zoo.HELD_OUT and not held & rest
    assert split == zoo.split_dataset(DATASET, seed=0) and split != zoo.split_dataset(DATASET, seed=1)
    assert {label for _, label in split["held_out"]} == {0, 1}


def test_every_network_is_imported_with_its_keras_preprocessing():
    flags = zoo.import_flags(zoo.NETWORKS["resnet50"])
    assert flags[flags.index("--color") + 1] == "bgr" and "--mean" in flags
    spec = zoo.training_spec(zoo.NETWORKS["xception"])
    assert (spec.input.height, spec.preprocess.offset) == (299, -1.0)
    assert set(zoo.DEFAULT_NETWORKS) == {"mobilenetv2", "resnet50", "vgg16", "xception", "inceptionv3",
                                        "efficientnetb0", "resnet152"}


def test_machine_facts_and_both_tables_carry_the_cpu_flags():
    from worker.sysinfo import cpu_isa_flags, machine_facts

    assert machine_facts().cpu_flags == ",".join(cpu_isa_flags())
    for table in ("results", "batches"):
        fields = {f["name"]: f for f in json.loads((REPO / "sql" / f"{table}_schema.json").read_text())}
        assert fields["cpu_flags"]["type"] == "STRING" and fields["cpu_flags"]["mode"] == "NULLABLE"
    assert (REPO / "sql" / "migrations" / "003_cpu_flags.md").is_file()


# --- The tiny network, built, imported, benched -----------------------------------------------------------

def test_a_head_only_fit_learns_and_folds_its_feature_scale_into_the_classifier():
    """VGG16-class networks get only their classifier fitted; the fitted layer must compute exactly
    the probe's logits (its feature scale folded into the kernel) and separate a separable task."""
    import keras

    rng = np.random.default_rng(3)
    # Two classes that differ in mean brightness and colour, as grass and moon do.
    x = np.concatenate([rng.normal(0.4, 0.2, (48, 32, 32, 3)), rng.normal(-0.4, 0.2, (48, 32, 32, 3))]).astype(np.float32)
    x[48:, ..., 1] -= 0.3
    y = np.asarray([0] * 48 + [1] * 48)
    model = zoo.build_keras(zoo.NETWORKS["tiny"], seed=0)
    body = keras.Model(model.inputs, model.layers[-1].input)
    record = zoo.train_head(model, x[::2], y[::2], seed=0)
    assert record["mode"] == "head" and record["images"] == 48 and record["features"] == 8
    logits = np.asarray(model(x[1::2], training=False))
    assert np.mean(logits.argmax(axis=1) == y[1::2]) >= 0.9
    # The folded layer equals kernel . features + bias recomputed in float64 from its own weights,
    # within float32 rounding of a sum of 8 products.
    kernel, bias = model.layers[-1].get_weights()
    features = np.asarray(body(x[1::2], training=False), dtype=np.float64)
    expected = features @ kernel.astype(np.float64) + bias
    bound = 8 * np.finfo(np.float32).eps * (np.abs(features) @ np.abs(kernel.astype(np.float64)) + np.abs(bias))
    assert np.all(np.abs(logits - expected) <= bound)
    # The body is untouched: only the classifier was fitted.
    assert all(np.array_equal(a, b) for a, b in zip(body.get_weights(), zoo.build_keras(zoo.NETWORKS["tiny"], 0).get_weights()[:-2]))


def test_heavy_networks_are_head_fitted_and_light_ones_keep_their_cache_keys():
    assert {n for n, net in zoo.NETWORKS.items() if net.training == "head"} == {"vgg16", "xception", "inceptionv3", "resnet152"}
    assert all(zoo.NETWORKS[n].train_images > 0 for n in zoo.DEFAULT_NETWORKS)
    # Builds cached before the training field existed stay valid for fully trained networks.
    assert "training" not in zoo.build_record_key(zoo.NETWORKS["mobilenetv2"], 0, Path("d"))["network"]
    assert zoo.build_record_key(zoo.NETWORKS["vgg16"], 0, Path("d"))["network"]["training"] == "head"


@pytest.fixture(scope="module")
def tiny_zoo(tmp_path_factory) -> Path:
    if not DATASET.is_dir():
        pytest.fail(f"no demo dataset at {DATASET}: run `make model` (make test does it for you)")
    root = tmp_path_factory.mktemp("zoo")
    done = subprocess.run([sys.executable, "-m", "modelkit", "zoo", "--networks", "tiny", "--root", str(root),
                           "--dataset-dir", str(DATASET)], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    assert "tiny" in done.stdout and "held-out accuracy" in done.stdout
    return root


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_the_zoo_imports_through_modelkit_import_and_caches(tiny_zoo):
    from modelspec.manifest import verify_manifest

    record = json.loads((tiny_zoo / "tiny" / "record.json").read_text())
    assert record["trained"] and record["training"]["images"] == 64 and record["training"]["train_s"] > 0
    assert 0.0 <= record["keras_held_out_accuracy"] <= 1.0
    assert record["imports"]["keras"]["command"].split()[1:4] == ["-m", "modelkit", "import"]
    dirs = zoo.model_dirs(tiny_zoo, "tiny")
    keras_manifest, onnx_manifest = verify_manifest(dirs["keras"]), verify_manifest(dirs["onnx"])
    assert {"saved_model", "openvino_fp32", "openvino_fp16", "openvino_int8"} <= set(keras_manifest["forms"])
    assert keras_manifest["quantization"]["openvino_int8"]["calibration"]["images"] == zoo.CALIBRATION
    assert {"onnx", "openvino_fp32"} <= set(onnx_manifest["forms"])
    # Both imports are judged on demo images, never random pixels (issue 14).
    assert keras_manifest["parity"]["inputs"] == onnx_manifest["parity"]["inputs"]
    assert onnx_manifest["parity"]["inputs"].endswith(f"calibration images from {tiny_zoo / 'tiny' / 'calibration'}")
    assert keras_manifest["spec"] == onnx_manifest["spec"] | {"input": keras_manifest["spec"]["input"]}
    # Held-out images were not calibration images.
    calibration = {str(p.relative_to(tiny_zoo / "tiny" / "calibration"))
                   for p in (tiny_zoo / "tiny" / "calibration").rglob("*.png")}
    assert not calibration & {rel for rel, _ in record["held_out"]}
    lines = []
    again = zoo.build_network("tiny", tiny_zoo, DATASET, log=lines.append)
    assert again == record and lines == [f"tiny: cached ({tiny_zoo / 'tiny' / 'record.json'})"]


@pytest.fixture(scope="module")
def bench_json(tiny_zoo, tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("bench-models")
    done = subprocess.run(
        [sys.executable, "-m", "localcloud.bench_models", "--models", "tiny", "--zoo-root", str(tiny_zoo),
         "--dataset-dir", str(DATASET), "--out", str(out), "--batch-sizes", "1,4", "--repeats", "2",
         "--min-repeat-s", "0.02", "--max-calls", "5"],
        cwd=REPO, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "make report" in done.stdout
    [written] = out.glob("bench-models-*.json")
    result = json.loads(written.read_text())
    assert json.loads((out / "latest.json").read_text()) == result
    return result


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_bench_models_writes_every_figure_for_every_configuration(bench_json):
    result = bench_json
    assert set(result["machine"]["cpu_flags"]) <= {"avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile", "fma"}
    assert result["machine"]["cpu_model"] and result["libraries"]["openvino"]
    [network] = result["networks"]
    assert network["network"] == "tiny" and network["trained"] and network["held_out_images"] == zoo.HELD_OUT
    assert network["load_avg_1m"]["before_timing"] >= 0 and network["left_out"] == {}
    keys = [f"{c['engine']}:{c['precision']}" for c in network["configs"]]
    assert keys == list(bm.DEFAULT_CONFIGS)
    for config in network["configs"]:
        for field in ("effective_precision", "engine_version", "form", "model_size_bytes", "load_s", "warmup_s",
                      "rss_after_load_bytes", "peak_rss_bytes", "process_start_to_ready_s"):
            assert config[field], (config["engine"], config["precision"], field)
        assert config["peak_rss_bytes"] >= config["rss_after_load_bytes"]
        f = config["fidelity"]
        assert 0.0 <= f["top1_agreement"] <= 1.0 and 0.0 <= f["accuracy"] <= 1.0 and f["max_abs_score_diff"] >= 0
        assert set(config["batches"]) == {"1", "4"}
        for batch in config["batches"].values():
            for figure in ("p50_ms", "p95_ms", "p99_ms", "images_per_s", "speedup_vs_tensorflow_f32",
                           "latency_reduction_vs_tensorflow_f32", "cpu_ms_per_image", "cpu_speedup_vs_tensorflow_f32"):
                s = batch[figure]
                assert s["n"] == 2 and s["min"] <= s["median"] <= s["max"], figure
            assert batch["p50_ms"]["median"] <= batch["p99_ms"]["max"]
    by_key = dict(zip(keys, network["configs"]))
    reference = by_key["tensorflow:f32"]
    assert reference["fidelity"]["top1_agreement"] == 1.0 and reference["fidelity"]["max_abs_score_diff"] == 0.0
    assert reference["batches"]["4"]["speedup_vs_tensorflow_f32"]["median"] == 1.0
    # float32 engines agree with the reference within float32 rounding; the precision that ran is recorded.
    for key in ("openvino:f32", "onnxruntime:f32"):
        assert by_key[key]["fidelity"]["max_abs_score_diff"] < 1e-4 and by_key[key]["effective_precision"] == "f32"
    assert by_key["openvino:int8"]["effective_precision"].startswith("int8")
    assert by_key["onnxruntime:f32"]["form"] == "onnx" and by_key["openvino:int8"]["form"] == "openvino_int8"


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_the_report_draws_the_model_dimension_from_the_bench_json(bench_json):
    from report import models
    from report.build import format_value

    [table] = models.tables(bench_json, "x.json", format_value)
    assert table["title"] == "Network tiny" and table["source"] == "x.json"
    assert len(table["cells"]) == len(bm.DEFAULT_CONFIGS) * 2 and all(len(r) == len(models.COLUMNS) for r in table["cells"])
    svg = models.speedup_against_fidelity(bench_json)
    assert svg.startswith("<?xml") and "openvino int8" in svg
    assert models.speedup_against_fidelity(None) is None and models.tables(None, "", format_value) == []


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_the_markdown_tables_quote_the_run(bench_json, tmp_path):
    from localcloud.bench_models_markdown import full_table, seeds_table

    path = tmp_path / "run.json"
    path.write_text(json.dumps(bench_json))
    done = subprocess.run([sys.executable, "-m", "localcloud.bench_models", "markdown", str(path)], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert str(path) in done.stdout and ",".join(bench_json["machine"]["cpu_flags"]) in done.stdout
    # One row per configuration and batch size; in the seeds' form, one per configuration but the reference.
    full = [line for line in full_table(bench_json).splitlines() if line.startswith("| tiny |")]
    assert len(full) == len(bm.DEFAULT_CONFIGS) * 2
    seeds = [line for line in seeds_table(bench_json).splitlines() if line.startswith("| tiny |")]
    assert len(seeds) == len(bm.DEFAULT_CONFIGS) - 1 and not any("tensorflow f32" in line for line in seeds)
    [network] = bench_json["networks"]
    int8 = next(c for c in network["configs"] if (c["engine"], c["precision"]) == ("openvino", "int8"))
    speedup = int8["batches"]["4"]["speedup_vs_tensorflow_f32"]["median"]
    assert any(f"| tiny | trained (acc {network['keras_held_out_accuracy']:.3f}) | openvino int8 |" in line
               and f"| {speedup:.2f} (" in line for line in seeds)


@pytest.mark.stack
@pytest.mark.slow
@pytest.mark.timeout(900)
def test_the_worker_runs_a_zoo_network_on_the_local_stack_next_to_the_bare_engine(tiny_zoo, tmp_path):
    env = {**os.environ, "LOCAL_RUN_DIR": str(tmp_path / "run")}
    done = subprocess.run(
        [sys.executable, "-m", "localcloud.bench_models", "--models", "tiny", "--zoo-root", str(tiny_zoo),
         "--dataset-dir", str(DATASET), "--out", str(tmp_path / "out"), "--engines", "openvino:f32",
         "--batch-sizes", "8", "--repeats", "1", "--min-repeat-s", "0.02", "--max-calls", "3",
         "--stack-models", "tiny", "--stack-engines", "openvino:f32", "--stack-batch-size", "8",
         "--stack-images", "40"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    result = json.loads((tmp_path / "out" / "latest.json").read_text())
    [row] = result["stack"]
    assert row["network"] == "tiny" and row["images"] == 40 and row["errors"] == 0
    assert row["worker_images_per_s"] > 0 and row["bare_images_per_s_matrix"] > 0
    assert row["worker_vs_bare_throughput"] == pytest.approx(row["worker_images_per_s"] / row["bare_images_per_s_matrix"])
    # The CPU view: the worker's own CPU per image (it does more than the engine call) and what the
    # emulators burnt beside it.
    assert row["worker_cpu_ms_per_image"] > 0 and row["emulators_cpu_ms_per_image"] > 0
    assert row["worker_vs_bare_cpu"] == pytest.approx(row["bare_cpu_ms_per_image_matrix"] / row["worker_cpu_ms_per_image"])
    assert set(row["cost_per_million_usd"]) == {"e2-standard-2", "e2-standard-4"}
    assert row["cost_per_million_usd"]["e2-standard-2"] > FIXED_COST_PER_MILLION
    assert row["raw"]["run_id"].startswith("bench-openvino-f32-b8")
    # The rows landed in BigQuery with the model and the CPU flags (migration 003); make report has
    # the model dimension: by_model.sql, the per-network table and the speed-up/fidelity plot.
    from worker.sysinfo import cpu_isa_flags

    report = subprocess.run(
        [sys.executable, "-m", "report", "--out", str(tmp_path / "report.html"), "--run-prefix", "bench-"],
        cwd=REPO, env={**env, "REPORT_BENCH_MODELS": str(tmp_path / "out" / "latest.json")},
        capture_output=True, text=True, timeout=300)
    assert report.returncode == 0, report.stderr[-3000:]
    html = (tmp_path / "report.html").read_text()
    by_model = html[html.index('id="by_model"'):]
    assert "zoo-tiny" in by_model and ",".join(cpu_isa_flags()) in by_model
    assert "Network tiny" in html and "Speed-up against fidelity" in html
    assert html.count('<img class="plot" src="data:image/svg+xml;base64,') == 4
