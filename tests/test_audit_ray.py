"""cv.audit on Ray Data: a local Ray cluster on 127.0.0.1 started here and shut down at the end
(also when a test fails). Same records as the local engine; a killed actor loses no batch; a Ray
run resumes a run that was cut short."""

from __future__ import annotations

import io
import os
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from audit_data import PROMPTS, same_records, scene_folder, tiny_clip
from model_state import assert_unchanged, snapshot
from PIL import Image

import captum_vlm as cv
from captum_vlm.audit.engines import start_local_ray
from captum_vlm.audit.store import RunStore

ray = pytest.importorskip("ray", reason="engine='ray' needs the ray extra")
psutil = pytest.importorskip("psutil")

KWARGS = dict(methods=["grad-eclip"], checks=("deletion", "grounding"))


@pytest.fixture(scope="module")
def ray_cluster():
    """2 CPUs, a 150 MB object store, on 127.0.0.1; shut down after the module, also on failure.

    Ray runs its workers at nice 15; on this shared 2-core machine that starves them, so the
    workers here run at the driver's priority (RAY_worker_niceness=0)."""
    before = os.environ.get("RAY_worker_niceness")
    os.environ["RAY_worker_niceness"] = "0"
    try:
        start_local_ray(num_cpus=2, object_store_memory=150 * 2**20)
        yield
    finally:
        ray.shutdown()
        if before is None:
            os.environ.pop("RAY_worker_niceness", None)
        else:
            os.environ["RAY_worker_niceness"] = before


def test_start_local_ray_turns_usage_stats_off_before_init(monkeypatch):
    seen = {}

    def fake_init(**kwargs):
        seen.update(kwargs, stats=os.environ.get("RAY_USAGE_STATS_ENABLED"),
                    data=os.environ.get("RAY_DATA_USAGE_DISABLED"))

    monkeypatch.delenv("RAY_USAGE_STATS_ENABLED", raising=False)
    monkeypatch.delenv("RAY_DATA_USAGE_DISABLED", raising=False)
    monkeypatch.setattr(ray, "init", fake_init)
    start_local_ray(num_cpus=1)
    assert (seen["stats"], seen["data"]) == ("0", "1")
    assert seen["_node_ip_address"] == "127.0.0.1" and seen["include_dashboard"] is False
    # a user's own choice is kept
    monkeypatch.setenv("RAY_USAGE_STATS_ENABLED", "1")
    start_local_ray(num_cpus=1)
    assert seen["stats"] == "1"


def test_a_cluster_that_does_not_start_is_a_clear_error_and_is_shut_down(monkeypatch):
    """Ray's driver gives the raylet 30 s to register (ray._private.services.get_node in a loop);
    start_local_ray asks again until its own deadline, then reports what to raise."""
    failures, shut = {"left": 3}, []

    def slow_get_node(*args):
        if failures["left"]:
            failures["left"] -= 1
            raise RuntimeError("node not found")
        return {"node": args}

    def fake_init(**kwargs):  # what Ray's Node does while it starts
        return ray._private.services.get_node("gcs", "node")

    monkeypatch.setattr(ray._private.services, "get_node", slow_get_node)
    monkeypatch.setattr(ray, "shutdown", lambda: shut.append(True))
    monkeypatch.setattr(ray, "init", fake_init)
    start_local_ray(startup_timeout_s=30, num_cpus=1)  # three refusals, then the node: no error
    assert failures["left"] == 0 and not shut
    assert ray._private.services.get_node is slow_get_node  # the patience is only for the start

    def timed_out(**kwargs):
        raise Exception("The current node timed out during startup.")

    monkeypatch.setattr(ray, "init", timed_out)
    with pytest.raises(RuntimeError, match=r"did not start.*timed out.*startup_timeout_s"):
        start_local_ray(startup_timeout_s=1, num_cpus=1)
    assert shut == [True]


@pytest.fixture(scope="module")
def clip():
    return tiny_clip()


@pytest.fixture(scope="module")
def local_run(clip, tmp_path_factory):
    """64 labelled scenes with masks, audited by the local engine."""
    model, processor = clip
    folder = scene_folder(tmp_path_factory.mktemp("data"), 64)
    result = cv.audit(model, processor, folder, PROMPTS, batch_size=8, output=tmp_path_factory.mktemp("local"),
                      **KWARGS)
    return folder, result.table()


def test_ray_gives_the_records_of_the_local_engine(ray_cluster, clip, local_run, tmp_path):
    model, processor = clip
    folder, local = local_run
    before = snapshot(model)
    result = cv.audit(model, processor, folder, PROMPTS, batch_size=8, engine="ray", concurrency=2,
                      output=tmp_path / "ray", **KWARGS)
    assert_unchanged(model, before)
    table = result.table()
    ids = table.column("id").to_pylist()
    assert len(ids) == len(set(ids)) == 64
    assert same_records(table, local)
    assert table.column("error").null_count == 64 and table.column("has_mask").to_pylist() == [True] * 64
    assert not (tmp_path / "ray" / "staging").exists()


def _actor_pids() -> list[int]:
    """The audit actors of this test's own cluster: its raylet is a child of this process, the
    actors are the raylet's workers (other users' Ray clusters on the machine are left alone)."""
    pids = []
    for proc in psutil.Process().children(recursive=True):
        try:
            if "AuditWorker" in " ".join(proc.cmdline()):
                pids.append(proc.pid)
        except psutil.Error:  # gone meanwhile
            continue
    return pids


def _writer_end(pipe: Path, deadline: float, running=lambda: True) -> int | None:
    """A write end of the named pipe once a reader has it open, or None if none did by
    ``deadline`` (or once ``running()`` is False). Opening for writing without blocking fails
    (ENXIO) while nobody reads."""
    while time.monotonic() < deadline and running():
        try:
            return os.open(pipe, os.O_WRONLY | os.O_NONBLOCK)
        except OSError:
            time.sleep(0.1)
    return None


def _feed_pipe(pipe: Path, payload: bytes, deadline: float) -> bool:
    """Write ``payload`` into the named pipe once a reader has opened it; False if none did by
    ``deadline``, or if the reader went away before the bytes were written."""
    fd = _writer_end(pipe, deadline)
    if fd is None:
        return False
    try:
        os.set_blocking(fd, True)
        os.write(fd, payload)
    except BrokenPipeError:
        return False
    finally:
        os.close(fd)
    return True


def test_a_killed_actor_loses_no_batch_and_ray_resumes_a_cut_run(ray_cluster, clip, local_run, tmp_path,
                                                                 monkeypatch):
    """A ray.data.Dataset of 24 images; a local run cut after 4 of them, then Ray finishes the
    rest. The mask of image 13 is a named pipe: the actor that reaches it waits there, the test
    kills that actor's process while it waits, and only then lets the pipe's mask through, to the
    actor Ray starts again. Image 13's batch must come out once, with its mask."""
    model, processor = clip
    folder, local = local_run
    names = [f"img-{i:03d}.png" for i in range(24)]
    labels = dict(zip(local.column("id").to_pylist(), local.column("label").to_pylist()))
    items = [{"id": n, "image": np.asarray(Image.open(folder / n).convert("RGB")), "label": labels[n],
              "mask_path": str(folder / n.replace("img-", "mask-").replace(".png", ".npy"))} for n in names]
    out = tmp_path / "out"

    real_write = RunStore.write_shard

    def stop_after_one(self, table):
        if any(self.records.glob("*.parquet")):
            raise KeyboardInterrupt
        return real_write(self, table)

    monkeypatch.setattr(RunStore, "write_shard", stop_after_one)
    with pytest.raises(KeyboardInterrupt):
        cv.audit(model, processor, items, PROMPTS, batch_size=4, output=out, **KWARGS)
    monkeypatch.setattr(RunStore, "write_shard", real_write)

    pipe = tmp_path / "mask-013.png"
    os.mkfifo(pipe)
    mask_png = io.BytesIO()
    Image.fromarray(np.load(folder / "mask-013.npy").astype(np.uint8) * 255, mode="L").save(mask_png, "PNG")
    items[13] = {**items[13], "mask_path": str(pipe)}
    dataset = ray.data.from_items(items, override_num_blocks=10)
    outcome = {}

    def run():
        try:
            outcome["result"] = cv.audit(model, processor, dataset, PROMPTS, batch_size=2, engine="ray",
                                         concurrency=1, output=out, **KWARGS)
        except BaseException as err:  # noqa: BLE001 - reported by the assertion below
            outcome["error"] = err

    thread = threading.Thread(target=run)
    thread.start()
    killed, fed = [], False
    try:
        # an actor has the pipe open and waits for its bytes
        waiting = _writer_end(pipe, time.monotonic() + 300, thread.is_alive)
        if waiting is not None:
            try:
                actors = [psutil.Process(pid) for pid in _actor_pids()]
                for actor in actors:
                    actor.kill()
                killed = [a.pid for a in actors]
                psutil.wait_procs(actors, timeout=30)
                # the actor Ray starts again opens the pipe; the write end held open until then, so
                # that it never reads an end of file before the mask
                fed = _feed_pipe(pipe, mask_png.getvalue(), time.monotonic() + 300)
            finally:
                os.close(waiting)
    finally:  # never leave the run waiting on the pipe
        while thread.is_alive() and _feed_pipe(pipe, mask_png.getvalue(), time.monotonic() + 5):
            pass
        thread.join(600)
    assert killed, "no actor waited on the pipe, so nothing was killed"
    assert fed, "the actor Ray started again never read image 13's mask: its batch was lost"
    assert "error" not in outcome, outcome.get("error")
    table = outcome["result"].table()
    ids = table.column("id").to_pylist()
    assert ids == names  # every image once: nothing lost, nothing twice
    assert table.column("error").null_count == len(names)
    want = local.filter(np.isin(local.column("id").to_numpy(zero_copy_only=False), names))
    assert same_records(table.drop_columns(["path"]), want.drop_columns(["path"]))


def test_records_reach_the_disk_while_actors_hold_every_cpu(ray_cluster, clip, local_run, tmp_path):
    """2 actors on the 2 CPUs. The first image is a named pipe, so the batch holding it waits
    until the test writes the image into it; the test does so only once Ray has written a shard
    of the other batches to the staging folder. Write tasks that need a CPU of their own would
    wait for that last batch: no shard appears, and the run is let go after the wait."""
    model, processor = clip
    folder, local = local_run
    names = [f"img-{i:03d}.png" for i in range(16)]
    data = tmp_path / "data"
    data.mkdir()
    for name in names[1:]:
        (data / name).write_bytes((folder / name).read_bytes())
    os.mkfifo(data / names[0])
    out = tmp_path / "out"
    outcome = {}

    def run():
        try:
            outcome["result"] = cv.audit(model, processor, [str(data / n) for n in names], PROMPTS, batch_size=1,
                                         engine="ray", concurrency=2, output=out, **KWARGS)
        except BaseException as err:  # noqa: BLE001 - reported by the assertion below
            outcome["error"] = err

    thread = threading.Thread(target=run)
    thread.start()
    staged = []
    try:
        deadline = time.monotonic() + 240
        while not staged and thread.is_alive() and time.monotonic() < deadline:
            staged = list((out / "staging").rglob("*.parquet")) if (out / "staging").is_dir() else []
            time.sleep(0.2)
    finally:  # let the waiting batch go, whatever was seen
        payload = (folder / names[0]).read_bytes()
        while thread.is_alive() and _feed_pipe(data / names[0], payload, time.monotonic() + 5):
            pass
        thread.join(600)
    assert "error" not in outcome, outcome.get("error")
    assert staged, "no shard was written while a batch was still running"
    table = outcome["result"].table()
    assert table.column("id").to_pylist() == sorted(str(data / n) for n in names)
    assert table.column("error").null_count == len(names)
