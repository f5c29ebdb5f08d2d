"""Rolling a newer model version into a running worker (worker/rollout.py, the runner's switch in
worker/batch.py) with in-memory fakes. The real stack, with a trained version, is in
tests/test_rollout_stack.py."""

from __future__ import annotations

import logging
import threading

import pytest

from tests.test_batch import MANIFEST, FakeEngine, FakeSink, Recorder, pool, runner, white_png  # noqa: F401
from tests.test_models_publish import make_version
from worker.batch import ServedModel
from worker.rollout import ModelWatcher, Refused, start_rollout, version_preparer
from worker.settings import SettingsError, WorkerSettings


class ClosableEngine(FakeEngine):
    def __init__(self):
        super().__init__()
        self.closed = False

    def close(self):
        self.closed = True


class HeldFetcher:
    """Holds the download of `held` until released: a batch still running on the old version."""

    def __init__(self, objects: dict, held: str):
        self.objects, self.held = objects, held
        self.entered, self.release = threading.Event(), threading.Event()

    def fetch(self, job):
        if job.name == self.held:
            self.entered.set()
            assert self.release.wait(10)
        return self.objects[job.name]


def served(version: int, engine=None) -> ServedModel:
    return ServedModel(engine or FakeEngine(), {**MANIFEST, "version": str(version)}, source=f"mem://demo/{version}")


def watcher_for(batch_runner, versions, prepare, serving=7):
    return ModelWatcher(root="mem://demo", serving_version=serving, list_versions=lambda: list(versions),
                        prepare=prepare, offer=batch_runner.offer, poll_s=1)


def test_the_switch_happens_between_batches_and_rows_carry_the_version_that_served_them(pool):
    old_engine, sink, rec = ClosableEngine(), FakeSink(), Recorder()
    objects = {f"{i}.png": white_png() for i in range(4)}
    batch_runner = runner(pool, objects, engine=old_engine, sink=sink)
    fetcher = batch_runner._fetcher = HeldFetcher(objects, held="0.png")
    reports = {}
    in_flight = threading.Thread(target=lambda: reports.update(old=batch_runner.run([rec.delivery("0.png")])))
    in_flight.start()
    assert fetcher.entered.wait(10)  # a batch that took version 7 is still downloading

    new_engine = FakeEngine()
    watcher = watcher_for(batch_runner, [6, 7, 8, 9], lambda v: served(v, new_engine))
    assert watcher.check() == 9  # the highest newer version, not 8
    reports["new"] = batch_runner.run([rec.delivery("1.png"), rec.delivery("2.png")])
    assert not old_engine.closed, "the old version was freed while a batch still held it"
    fetcher.release.set()
    in_flight.join(10)

    rows = {row["object_name"]: row for row in sink.tables["p.d.results"]}
    assert {name: row["model_version"] for name, row in rows.items()} == {"0.png": "7", "1.png": "9", "2.png": "9"}
    assert rows["1.png"]["cold"] is True  # the new version's first batch
    assert new_engine.batches == [2] and old_engine.batches == [1]
    assert old_engine.closed, "the old version was not freed after its last batch"
    assert (batch_runner.model_version, watcher.serving_version) == ("9", 9)
    assert watcher.check() is None  # nothing newer than 9
    assert sorted(rec.acked) == ["0.png", "1.png", "2.png"]


def test_a_refused_version_is_logged_skipped_for_the_next_one_down_and_never_tried_again(pool, caplog):
    batch_runner = runner(pool, {"a.png": white_png()})
    tried = []

    def prepare(version):
        tried.append(version)
        if version == 9:
            raise Refused("fails verification: variables.data differs from the manifest (sha256 mismatch)")
        return served(version)

    watcher = watcher_for(batch_runner, [7, 8, 9], prepare)
    with caplog.at_level(logging.WARNING, logger="worker.rollout"):
        assert watcher.check() == 8
        assert watcher.check() is None

    assert tried == [9, 8]
    assert set(watcher.refused) == {9}
    assert "refused model version mem://demo/9: fails verification" in caplog.text
    assert "still serving version 7" in caplog.text
    report = batch_runner.run([Recorder().delivery("a.png")])
    assert report.result_rows[0]["model_version"] == "8"


def test_when_every_newer_version_is_refused_the_old_one_keeps_serving(pool):
    batch_runner = runner(pool, {"a.png": white_png()})

    def prepare(version):
        raise Refused("fails to load: RuntimeError: cannot read model.xml")

    watcher = watcher_for(batch_runner, [7, 8], prepare)

    assert watcher.check() is None
    report = batch_runner.run([Recorder().delivery("a.png")])
    assert report.result_rows[0]["model_version"] == "7" and report.results == 1


def test_a_failure_that_may_pass_is_not_a_refusal_and_the_version_is_tried_again(pool):
    batch_runner = runner(pool, {})
    attempts = []

    def prepare(version):
        attempts.append(version)
        if len(attempts) == 1:
            raise ConnectionError("the bucket did not answer")
        return served(version)

    watcher = watcher_for(batch_runner, [8], prepare)

    with pytest.raises(ConnectionError):
        watcher.check()
    assert watcher.refused == {}
    assert watcher.check() == 8


def test_a_second_offer_before_any_batch_replaces_the_first_and_frees_it(pool):
    batch_runner = runner(pool, {"a.png": white_png()})
    first = ClosableEngine()
    batch_runner.offer(served(8, first))
    batch_runner.offer(served(9))

    report = batch_runner.run([Recorder().delivery("a.png")])

    assert first.closed and first.batches == []
    assert report.result_rows[0]["model_version"] == "9"


# The real preparer on local version folders: verification and loading ---------------------------

def demo_like_version(models_root, version: int):
    """A small version whose manifest reads as the demo CNN's spec (no real model inside)."""
    from modelspec.manifest import load_manifest, write_manifest

    version_dir = make_version(models_root, "demo", version, payload=b"v%d" % version)
    manifest = load_manifest(version_dir)
    manifest["input"] = MANIFEST["input"]
    write_manifest(version_dir, manifest)
    return version_dir


def test_the_preparer_refuses_tampered_and_unloadable_versions_and_the_lister_skips_half_published(tmp_path):
    from worker.rollout import version_lister

    root = tmp_path / "demo"
    for version in (1, 2, 3):
        demo_like_version(tmp_path, version)
    (root / "2" / "variables" / "variables.data").write_bytes(b"tampered after publishing")
    (root / "4").mkdir()  # half-published: files, no manifest yet
    (root / "4" / "saved_model.pb").write_bytes(b"partial")

    def load_engine(path, manifest):
        if manifest["version"] == 3:
            raise RuntimeError(f"cannot read {path}/saved_model.pb")
        return FakeEngine()

    prepare = version_preparer(str(root), tmp_path / "cache", storage_client=None, load_engine=load_engine)

    assert version_lister(str(root), storage_client=None)() == [3, 2, 1]
    with pytest.raises(Refused, match=r"fails verification: .*variables.data differs"):
        prepare(2)
    with pytest.raises(Refused, match=r"fails to load: RuntimeError: cannot read"):
        prepare(3)
    assert prepare(1).version == "1"


def test_rollout_starts_only_for_a_model_root_with_polling_on(tmp_path, pool):
    make_version(tmp_path, "demo", 7)
    batch_runner = runner(pool, {})
    common = dict(cache_dir=tmp_path / "cache", storage_client=None, load_engine=lambda p, m: FakeEngine())

    pinned = start_rollout(batch_runner, location=str(tmp_path / "demo" / "7"), poll_s=30, **common)
    never = start_rollout(batch_runner, location=str(tmp_path / "demo"), poll_s=0, **common)
    watching = start_rollout(batch_runner, location=str(tmp_path / "demo"), poll_s=30, **common)
    try:
        assert pinned is None and never is None
        assert watching is not None and watching.serving_version == 7
    finally:
        watching.stop()


def test_the_poll_setting_is_validated_with_a_message_naming_it(tmp_path):
    base = {"GOOGLE_CLOUD_PROJECT": "p", "WORKER_SUBSCRIPTION": "s", "WORKER_RESULTS_TABLE": "p.d.r",
            "WORKER_ERRORS_TABLE": "p.d.e", "WORKER_MODEL_URI": "gs://bucket/models/demo"}

    assert WorkerSettings.from_env(base).model_poll_s == 60.0
    assert WorkerSettings.from_env({**base, "WORKER_MODEL_POLL_S": "0"}).model_poll_s == 0
    assert WorkerSettings.from_env({**base, "WORKER_MODEL_POLL_S": "2.5"}).model_poll_s == 2.5
    for bad in ("-1", "0.2", "nan", "100000"):
        with pytest.raises(SettingsError, match=r"WORKER_MODEL_POLL_S=.* must be 0 \(never look"):
            WorkerSettings.from_env({**base, "WORKER_MODEL_POLL_S": bad})
    with pytest.raises(SettingsError, match="WORKER_MODEL_POLL_S='soon' is not a valid float"):
        WorkerSettings.from_env({**base, "WORKER_MODEL_POLL_S": "soon"})


def test_classify_follows_the_switch_to_the_new_engine(pool):
    import time

    from modelspec.preprocess import DecodeLimits
    from worker.http.service import InferenceService, LoadedModel, ServiceOptions

    old_engine, new_engine = FakeEngine(), FakeEngine()
    batch_runner = runner(pool, {"a.png": white_png()}, engine=old_engine)
    service = InferenceService(lambda: LoadedModel(batch_runner), ServiceOptions(limits=DecodeLimits(), results_table=""),
                               record_sink=None, sink_check=None, machine_row={}, sample_system=dict)
    service.start().join(10)
    try:
        assert service.ready
        service.classify(white_png(), time.monotonic())
        batch_runner.offer(served(8, new_engine))
        batch_runner.run([Recorder().delivery("a.png")])  # the switch happens at this batch's start
        service.classify(white_png(), time.monotonic())

        assert old_engine.batches == [1] and new_engine.batches == [1, 1]
        assert service.model_facts()["model_version"] == "8"
    finally:
        service.stop(5)
