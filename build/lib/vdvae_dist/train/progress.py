"""What rank 0 shows while training: a tqdm bar on a terminal, else one line per logged
step (Ray workers' output is a pipe, where a bar would only print when it finishes)."""
from __future__ import annotations

import sys
import time

from tqdm import tqdm


def _duration(seconds: float) -> str:
    m, s = divmod(int(seconds), 60)
    h, m = divmod(m, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


def say(*parts) -> None:
    """One console line, written to stdout directly: Ray Train patches `print` in workers
    and, once MLflow wraps stdout, prints every line twice."""
    sys.stdout.write(" ".join(map(str, parts)) + "\n")
    sys.stdout.flush()


class Progress:
    def __init__(self, total: int, initial: int, enabled: bool):
        self.total, self.start_step, self.enabled = total, initial, enabled
        self.t0 = time.perf_counter()
        interactive = enabled and sys.stderr.isatty()
        self.bar = tqdm(total=total, initial=initial, desc="train", unit="step", dynamic_ncols=True,
                        file=sys.stderr) if interactive else None

    def update(self, step: int, row: dict | None) -> None:
        """Every step; `row` (the logged metrics) on logging steps only."""
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.update(step - self.bar.n)
            if row:
                self.bar.set_postfix(loss=f"{row['loss']:.4f}", bpd=f"{row['bits_per_dim']:.3f}",
                                     img_s=f"{row['images_per_s']:.1f}", skipped=row["skipped"])
            return
        if row:
            elapsed = time.perf_counter() - self.t0
            done = step - self.start_step
            eta = elapsed / done * (self.total - step) if done else float("nan")
            say(f"step {step}/{self.total}  loss {row['loss']:.4f}  bits/dim {row['bits_per_dim']:.3f}  "
                f"{row['images_per_s']:.1f} img/s  skipped {row['skipped']}  "
                f"elapsed {_duration(elapsed)}  ETA {_duration(eta) if eta == eta else '?'}")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
