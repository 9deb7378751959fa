"""What the user sees and what is kept: metric lines, a JSONL file, TensorBoard events, spike counters."""
from __future__ import annotations

import json
import math
import os
from typing import Dict, Optional


class SpikeCounter:
    """Counts values above running mean + sigma * running std (exponential moving estimates).

    The first ``warmup`` values only feed the estimates; a spike does not update them, so one spike does not hide
    the next.
    """

    def __init__(self, sigma: float, alpha: float = 0.05, warmup: int = 20):
        self.sigma, self.alpha, self.warmup = sigma, alpha, warmup
        self.mean: Optional[float] = None
        self.var = 0.0
        self.seen = 0
        self.count = 0

    def update(self, value: float) -> bool:
        if not math.isfinite(value):
            return False
        self.seen += 1
        if self.mean is None:
            self.mean = value
            return False
        spike = self.seen > self.warmup and value > self.mean + self.sigma * math.sqrt(self.var)
        if spike:
            self.count += 1
            return True
        delta = value - self.mean
        self.mean += self.alpha * delta
        self.var = (1 - self.alpha) * (self.var + self.alpha * delta * delta)
        return False

    def state(self) -> Dict:
        return {"mean": self.mean, "var": self.var, "seen": self.seen, "count": self.count}

    def load(self, s: Dict) -> None:
        self.mean, self.var, self.seen, self.count = s["mean"], s["var"], s["seen"], s["count"]


class MetricsWriter:
    """Appends one JSON object per record to ``metrics.jsonl`` and mirrors scalars to TensorBoard."""

    def __init__(self, output_dir: str, tensorboard: bool):
        self.path = os.path.join(output_dir, "metrics.jsonl")
        self._fh = open(self.path, "a", encoding="utf-8")
        self._tb = None
        if tensorboard:
            from tensorboardX import SummaryWriter

            self._tb = SummaryWriter(os.path.join(output_dir, "tensorboard"))

    def write(self, record: Dict) -> None:
        self._fh.write(json.dumps(record) + "\n")
        self._fh.flush()
        if self._tb is not None:
            step = record.get("step", 0)
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool):
                    self._tb.add_scalar(f"{record.get('kind', 'train')}/{key}", value, step)

    def close(self) -> None:
        self._fh.close()
        if self._tb is not None:
            self._tb.close()
