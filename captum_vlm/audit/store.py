"""The output folder of an audit: Parquet shards, the manifest, and resuming.

``output/records/*.parquet`` only ever holds complete shards: the local engine writes each one
under a temporary name and renames it; files Ray's Parquet writer left in ``output/staging/``
are moved in only once they read back whole (a Parquet file's footer is written last, so a cut
file does not read), without rows whose id is already recorded. The ids in ``records/`` are the
done ids; ``manifest.json`` holds the configuration, so a restarted run with the same output
resumes, and one with another configuration is refused.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from captum_vlm.audit.worker import AuditConfig

__all__ = ["RunStore"]


class RunStore:
    """An audit's output folder.

    Args:
        output: the folder (created when missing).
        config: the run's configuration; a folder written with another one raises ``ValueError``.
        writable: ``False`` only reads (touches nothing, so a run in progress is left alone).
    """

    def __init__(self, output: str | Path, config: AuditConfig, writable: bool = True):
        self.root = Path(output)
        self.records = self.root / "records"
        self.staging = self.root / "staging"
        self.config = config
        manifest = self.root / "manifest.json"
        if manifest.is_file():
            written = json.loads(manifest.read_text(encoding="utf-8"))["config"]
            if written != json.loads(config.to_json()):
                raise ValueError(
                    f"output: {str(self.root)!r} holds an audit with another configuration "
                    f"({written}); pass a new output folder to start a different audit"
                )
        if not writable:
            return
        self.records.mkdir(parents=True, exist_ok=True)
        for leftover in self.records.glob(".tmp-*"):  # a shard cut by an interruption
            leftover.unlink()
        self._write_manifest()

    def _write_manifest(self) -> None:
        shards = [p.name for p in self.shard_paths()]
        text = json.dumps({"config": json.loads(self.config.to_json()), "shards": shards}, indent=1)
        self._atomic_write(self.root / "manifest.json", text.encode("utf-8"))

    def _atomic_write(self, path: Path, data: bytes) -> None:
        tmp = path.with_name(f".tmp-{uuid.uuid4().hex}-{path.name}")
        tmp.write_bytes(data)
        os.replace(tmp, path)

    def shard_paths(self) -> list[Path]:
        """The complete shards (temporary files of a shard being written are not among them)."""
        if not self.records.is_dir():
            return []
        return sorted(p for p in self.records.glob("*.parquet") if not p.name.startswith("."))

    def done_ids(self) -> set[str]:
        """Ids of the images whose records are written."""
        done: set[str] = set()
        for path in self.shard_paths():
            done.update(pq.read_table(path, columns=["id"]).column("id").to_pylist())
        return done

    def write_shard(self, table: pa.Table) -> Path:
        """Write ``table`` as a new shard (temporary name, then rename). Returns its path."""
        final = self.records / f"shard-{uuid.uuid4().hex}.parquet"
        tmp = self.records / f".tmp-{final.name}"
        pq.write_table(table, tmp)
        os.replace(tmp, final)
        self._write_manifest()
        return final

    def new_staging(self) -> Path:
        """A fresh folder for Ray's Parquet writer."""
        folder = self.staging / uuid.uuid4().hex
        folder.mkdir(parents=True)
        return folder

    def adopt_staged(self) -> int:
        """Move complete staged files into ``records/`` (dropping rows already recorded and
        files that do not read back whole). Returns the number of rows adopted."""
        if not self.staging.is_dir():
            return 0
        done, adopted = self.done_ids(), 0
        for path in sorted(self.staging.rglob("*.parquet")):
            try:
                table = pq.read_table(path)
            except (OSError, pa.ArrowException):  # cut short: its batch is computed again
                path.unlink()
                continue
            fresh = pc.invert(pc.is_in(table.column("id"), value_set=pa.array(sorted(done), pa.string())))
            table = table.filter(fresh)
            if table.num_rows:
                table = table.select(_schema_of(self.config).names).cast(_schema_of(self.config))
                self.write_shard(table)
                done.update(table.column("id").to_pylist())
                adopted += table.num_rows
            path.unlink()
        shutil.rmtree(self.staging, ignore_errors=True)
        return adopted

    def table(self) -> pa.Table:
        """Every record, sorted by id."""
        schema = _schema_of(self.config)
        tables = [pq.read_table(p).select(schema.names).cast(schema) for p in self.shard_paths()]
        if not tables:
            return schema.empty_table()
        return pa.concat_tables(tables).sort_by("id")


def _schema_of(config: AuditConfig) -> pa.Schema:
    from captum_vlm.audit.worker import record_schema

    return record_schema(config)
