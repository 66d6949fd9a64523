"""What a run tells: log lines (stdout and ``train.log``), ``metrics.csv``, TensorBoard,
a progress bar, and ``summary.json``. Only rank 0 writes; other ranks get no-ops."""

from __future__ import annotations

import csv
import json
import os
import sys
import time
from typing import Optional

CHECKPOINT = "checkpoint.pt"  # in the output directory, beside the files below

METRIC_COLUMNS = ("epoch", "step", "lr", "train_loss", "train_top1", "val_top1", "val_top5", "val_loss",
                  "clips_per_s", "skipped", "time_s")


class RunLog:
    """Rank 0's log of a run in ``output_dir``; ``enabled=False`` makes every call a no-op."""

    def __init__(self, output_dir: str, *, enabled: bool, tensorboard: bool):
        self.output_dir = output_dir
        self.enabled = enabled
        self.tensorboard = tensorboard
        self.writer = None
        self._text = None
        if not enabled:
            return
        os.makedirs(output_dir, exist_ok=True)
        self._text = open(os.path.join(output_dir, "train.log"), "a", encoding="utf-8")

    def start(self, keep_epochs: int, purge_step: int) -> None:
        """Begin the per-epoch and per-step records of a run that has reported everything up
        to epoch ``keep_epochs`` and step ``purge_step - 1``: ``metrics.csv`` keeps only the rows of
        those epochs, and TensorBoard hides the points at ``purge_step`` and later that an
        earlier, killed run wrote (they are written again, with the same values)."""
        if not self.enabled:
            return
        path = os.path.join(self.output_dir, "metrics.csv")
        if os.path.exists(path):
            with open(path, newline="", encoding="utf-8") as f:
                rows = [r for r in csv.DictReader(f) if r.get("epoch", "").isdigit() and int(r["epoch"]) <= keep_epochs]
            tmp = path + ".tmp"
            with open(tmp, "w", newline="", encoding="utf-8") as f:
                w = csv.DictWriter(f, fieldnames=METRIC_COLUMNS, extrasaction="ignore")
                w.writeheader()
                w.writerows(rows)
            os.replace(tmp, path)
        if self.tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as e:
                self.info(f"TensorBoard logs are off: {e} (pip install tensorboard)")
            else:
                self.writer = SummaryWriter(os.path.join(self.output_dir, "tb"), purge_step=purge_step)

    def info(self, message: str) -> None:
        if not self.enabled:
            return
        line = f"[{time.strftime('%H:%M:%S')}] {message}"
        print(line, flush=True)
        self._text.write(line + "\n")
        self._text.flush()

    def scalars(self, step: int, values: dict) -> None:
        if self.writer is not None:
            for key, value in values.items():
                if value is not None:
                    self.writer.add_scalar(key, value, step)

    def metrics(self, row: dict) -> None:
        """Append one row to ``metrics.csv`` (written with a header when new)."""
        if not self.enabled:
            return
        path = os.path.join(self.output_dir, "metrics.csv")
        new = not os.path.exists(path)
        with open(path, "a", newline="", encoding="utf-8") as f:
            w = csv.DictWriter(f, fieldnames=METRIC_COLUMNS)
            if new:
                w.writeheader()
            w.writerow({k: _fmt(row.get(k)) for k in METRIC_COLUMNS})

    def write_json(self, name: str, data: dict) -> None:
        if not self.enabled:
            return
        path = os.path.join(self.output_dir, name)
        tmp = path + ".tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(data, f, indent=2)
            f.write("\n")
        os.replace(tmp, path)

    def write_text(self, name: str, text: str) -> None:
        if self.enabled:
            with open(os.path.join(self.output_dir, name), "w", encoding="utf-8") as f:
                f.write(text)

    def progress(self, total: int, initial: int, desc: str, setting) -> Optional[object]:
        """A tqdm bar over micro-batches, or None (then the loop logs every few steps)."""
        if not self.enabled:
            return None
        show = sys.stderr.isatty() if setting == "auto" else bool(setting)
        if not show:
            return None
        try:
            from tqdm import tqdm
        except ImportError:
            return None
        return tqdm(total=total, initial=initial, desc=desc, dynamic_ncols=True, mininterval=1.0, leave=False)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        if self._text is not None:
            self._text.close()


def _fmt(value):
    if isinstance(value, float):
        return f"{value:.6g}"
    return "" if value is None else value
