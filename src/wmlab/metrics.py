"""Training metrics: a plain CSV anyone can read, and TensorBoard event files.

The CSV is appended row by row and flushed, so a killed run keeps every logged row; when a
run resumes at step s, rows logged after s by the killed attempt are dropped first, so the
file shows one continuous learning curve.
"""

from __future__ import annotations

import csv
import os
from typing import Any

import fsspec

METRICS_FILE = "metrics.csv"  # the plain metrics of a training stage, in its folder


class MetricsLogger:
    def __init__(self, folder: str, resume_step: int | None = None, tensorboard: bool = True):
        self.folder = folder.rstrip("/")
        self.fs, self.path = fsspec.core.url_to_fs(f"{self.folder}/{METRICS_FILE}")
        self.fs.makedirs(self.path.rsplit("/", 1)[0], exist_ok=True)
        self._fields: list[str] | None = None
        self._rows = self._read_existing(resume_step)
        self._writer_tb = None
        is_local = "file" in (self.fs.protocol if isinstance(self.fs.protocol, tuple)
                              else (self.fs.protocol,))
        if tensorboard and is_local:
            from torch.utils.tensorboard import SummaryWriter

            self._writer_tb = SummaryWriter(os.path.join(self.path.rsplit("/", 1)[0], "tb"),
                                            purge_step=resume_step)

    def _read_existing(self, resume_step: int | None) -> list[dict[str, str]]:
        if resume_step is None or not self.fs.exists(self.path):
            return []
        with self.fs.open(self.path, "r") as handle:
            rows = [r for r in csv.DictReader(handle) if int(float(r["step"])) <= resume_step]
        if rows:
            self._fields = list(rows[0].keys())
        return rows

    def log(self, step: int, values: dict[str, Any]) -> None:
        row = {"step": step, **values}
        if self._fields is None or any(k not in self._fields for k in row):
            self._fields = list(dict.fromkeys([*(self._fields or []), *row]))
        self._rows.append({k: str(v) for k, v in row.items()})
        self._write_csv()
        if self._writer_tb is not None:
            for key, value in values.items():
                if isinstance(value, (int, float)):
                    self._writer_tb.add_scalar(key, value, step)

    def _write_csv(self) -> None:
        # Rewrite whole (small) file via a temporary name: a kill never leaves a torn row.
        tmp = f"{self.path}.tmp"
        with self.fs.open(tmp, "w") as handle:
            writer = csv.DictWriter(handle, fieldnames=self._fields, restval="")
            writer.writeheader()
            writer.writerows(self._rows)
        self.fs.mv(tmp, self.path)

    def rows(self) -> list[dict[str, str]]:
        return list(self._rows)

    def close(self) -> None:
        if self._writer_tb is not None:
            self._writer_tb.close()
