"""The two engines: in-process batches, and Ray Data ``map_batches`` over actors.

Both run :class:`~captum_vlm.audit.worker.AuditWorker` on the rows not yet recorded in the
output folder, so they write the same records and resume each other's runs.
"""

from __future__ import annotations

import logging
import os
from typing import Any

from tqdm.auto import tqdm

from captum_vlm.audit.store import RunStore
from captum_vlm.audit.worker import AuditWorker

__all__ = ["import_ray", "run_local", "run_ray", "start_local_ray"]

WRITE_CPUS = 0  # CPUs a Ray write task asks for (writing a shard of records is light)


def import_ray():
    """``ray`` with Ray Data, or an ImportError naming the extra."""
    try:
        import ray
        import ray.data  # noqa: F401
    except ImportError as err:
        raise ImportError('engine="ray" needs Ray Data: pip install "captum-vlm[ray]"') from err
    return ray


def run_local(model, processor, config, rows: list[dict], store: RunStore, batch_size: int,
              show_progress: bool) -> int:
    """Audit ``rows`` in process, ``batch_size`` images per shard. Returns the rows written.

    Memory is bounded by one batch: images are opened by the worker and records go to disk.
    """
    done = store.done_ids()
    pending = [r for r in rows if r["id"] not in done]
    worker = AuditWorker(model, processor, config)
    with tqdm(total=len(rows), initial=len(rows) - len(pending), desc="audit", unit="image",
              disable=not show_progress) as bar:
        for start in range(0, len(pending), batch_size):
            batch = pending[start : start + batch_size]
            store.write_shard(worker(batch))
            bar.update(len(batch))
    return len(pending)


def start_local_ray(startup_timeout_s: float = 180.0, **init_kwargs: Any) -> None:
    """``ray.init`` of a local cluster bound to 127.0.0.1, without the dashboard.

    On a loaded machine Ray's own start-up limits are missed: the raylet waits a limited time for
    its metrics agent (``RAY_agent_register_timeout_ms``, ``RAY_raylet_start_wait_time_s``: set
    here to ``startup_timeout_s`` unless they are set already) and the driver gives the raylet a
    fixed 30 s to register (no setting exists for it; while this call starts the cluster the
    driver asks again until ``startup_timeout_s``, where Ray has ``ray._private.services.get_node``).
    A cluster that still does not start is shut down and reported as a ``RuntimeError`` saying
    what to raise.

    Ray's usage-stats reporting (which sends data off the machine) and Ray Data's usage poller are
    turned off for the cluster this starts, unless ``RAY_USAGE_STATS_ENABLED`` /
    ``RAY_DATA_USAGE_DISABLED`` are set already.

    Args:
        startup_timeout_s: how long the cluster may take to start.
        **init_kwargs: more ``ray.init`` arguments (``num_cpus``, ``object_store_memory``...).

    Raises:
        RuntimeError: the cluster did not start within ``startup_timeout_s``.

    Example:
        >>> start_local_ray(startup_timeout_s=600, num_cpus=2)  # a busy machine   # doctest: +SKIP
        >>> cv.audit(model, processor, data, texts, engine="ray")  # uses it       # doctest: +SKIP
    """
    import time
    from unittest import mock

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("RAY_DATA_USAGE_DISABLED", "1")
    ray = import_ray()
    services = getattr(getattr(ray, "_private", None), "services", None)
    real = getattr(services, "get_node", None)

    def patient_get_node(*args, **kwargs):
        deadline = time.monotonic() + startup_timeout_s
        while True:
            try:
                return real(*args, **kwargs)
            except RuntimeError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.5)

    # Ray's Node asks services.get_node in a loop limited to 30 s; the wait is not a setting
    patch = mock.patch.object(services, "get_node", patient_get_node) if callable(real) else mock.MagicMock()
    agent_wait = {
        "RAY_agent_register_timeout_ms": os.environ.get("RAY_agent_register_timeout_ms",
                                                        str(int(startup_timeout_s * 1000))),
        "RAY_raylet_start_wait_time_s": os.environ.get("RAY_raylet_start_wait_time_s", str(int(startup_timeout_s))),
    }
    start = time.monotonic()
    try:
        with patch, mock.patch.dict(os.environ, agent_wait):
            ray.init(_node_ip_address="127.0.0.1", include_dashboard=False, logging_level=logging.WARNING,
                     **init_kwargs)
    except Exception as err:  # Ray raises bare Exception for a node that timed out during startup
        ray.shutdown()  # whatever part of the cluster did start
        raise RuntimeError(
            f"Ray's local cluster did not start ({type(err).__name__}: {err}) after "
            f"{time.monotonic() - start:.0f} s; on a busy machine give it longer with "
            f"captum_vlm.audit.engines.start_local_ray(startup_timeout_s=...) before cv.audit (now "
            f"{startup_timeout_s:g} s), or start a cluster with `ray start --head` and pass address="
        ) from err


def _start_ray(ray, address: str | None) -> None:
    if ray.is_initialized():
        return
    if address is not None:
        ray.init(address=address, logging_level=logging.WARNING)
    else:  # a local cluster on this machine only
        start_local_ray()


def run_ray(model, processor, config, data: Any, store: RunStore, batch_size: int, concurrency: int,
            num_cpus: float, num_gpus: float, address: str | None, show_progress: bool) -> int:
    """Audit with Ray Data: ``map_batches(AuditWorker)`` over ``concurrency`` actors (each holds
    the model once), records written by Ray's Parquet writer into a staging folder as the batches
    finish (its write tasks ask for no CPU, so they run beside actors that hold every CPU) and
    moved into ``records/`` once whole (at the end, or by the next run after an interruption). Ray Data restarts a dead actor and retries its batch
    (its actor pools default to ``max_restarts=-1``, ``max_task_retries=-1``).

    Args:
        data: the rows (a list of dicts) or a ``ray.data.Dataset`` with an ``id`` (or ``path``)
            column and ``image``/``path``, optionally ``label``, ``mask``, ``mask_path``, ``box``.

    Returns:
        The number of records adopted by this run.
    """
    ray = import_ray()
    _start_ray(ray, address)
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = show_progress
    context.print_on_execution_start = show_progress
    store.adopt_staged()  # what an interrupted run finished writing
    done = store.done_ids()
    if isinstance(data, list):
        pending = [r for r in data if r["id"] not in done]
        if not pending:
            return 0
        blocks = max(1, min(len(pending) // batch_size, 4 * concurrency * 8))
        dataset = ray.data.from_items(pending, override_num_blocks=blocks)
    else:
        dataset = _ray_rows(data, done)
    model_ref, processor_ref = ray.put(model), ray.put(processor)  # held until the run ends (restarts)
    records = dataset.map_batches(
        AuditWorker, fn_constructor_kwargs={"model": model_ref, "processor": processor_ref,
                                            "config": config.to_json()},
        batch_size=batch_size, batch_format="numpy", compute=ray.data.ActorPoolStrategy(size=concurrency),
        num_cpus=num_cpus, num_gpus=num_gpus,
        # one torch thread per CPU the actor holds (torch would take every core of the machine)
        runtime_env={"env_vars": {"OMP_NUM_THREADS": str(max(1, int(num_cpus)))}},
    )
    data_logger = logging.getLogger("ray.data")
    level = data_logger.level
    data_logger.setLevel(logging.INFO if show_progress else logging.WARNING)
    try:
        # the write tasks ask for no CPU: with as many actors as CPUs, write tasks of 1 CPU (Ray's
        # default) wait for the last batch, so nothing would reach the disk until the end
        records.write_parquet(str(store.new_staging()), ray_remote_args={"num_cpus": WRITE_CPUS})
    finally:
        data_logger.setLevel(level)
    del model_ref, processor_ref
    return store.adopt_staged()


def _ray_rows(dataset: Any, done: set[str]):
    """A user's ``ray.data.Dataset`` without the rows already recorded; ids from ``id`` or ``path``."""
    names = set(dataset.schema().names)
    if "id" not in names:
        if "path" not in names:
            raise ValueError(f"data: the ray.data.Dataset needs an 'id' or 'path' column; it has {sorted(names)}")
        dataset = dataset.add_column("id", lambda batch: batch["path"].astype(str), batch_format="pandas")
    if "image" not in names and "path" not in names:
        raise ValueError(f"data: the ray.data.Dataset needs an 'image' or 'path' column; it has {sorted(names)}")
    if done:
        dataset = dataset.map_batches(_drop_done, fn_kwargs={"done": sorted(done)}, batch_format="pyarrow")
    return dataset


def _drop_done(batch, done: list[str]):
    """The rows of a ``pyarrow`` batch whose id is not in ``done``."""
    import pyarrow as pa
    import pyarrow.compute as pc

    ids = pc.cast(batch.column("id"), pa.string())
    return batch.filter(pc.invert(pc.is_in(ids, value_set=pa.array(done, pa.string()))))
