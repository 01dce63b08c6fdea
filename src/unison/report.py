"""Metrics sinks (JSONL always, TensorBoard when installed), console lines, and figures."""

from __future__ import annotations

import json
import math
from pathlib import Path

from unison.checkpoint import append_jsonl


def _clean(value):
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


class MetricsLog:
    """Appends one JSON object per step to `metrics.jsonl`; mirrors scalars to TensorBoard when available."""

    def __init__(self, run_dir: Path, tensorboard: bool = True):
        self.path = Path(run_dir) / "metrics.jsonl"
        self.writer = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.writer = SummaryWriter(str(Path(run_dir) / "tensorboard"))
            except (ImportError, ModuleNotFoundError):
                self.writer = None

    def write(self, step: int, metrics: dict) -> None:
        append_jsonl(self.path, {"step": step, **{k: _clean(v) for k, v in metrics.items()}})
        if self.writer is not None:
            for key, value in metrics.items():
                if isinstance(value, (int, float)) and math.isfinite(value):
                    self.writer.add_scalar(key, value, step)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def read_metrics(run_dir: str | Path) -> list[dict]:
    """The rows of a run folder's metrics.jsonl."""
    path = Path(run_dir) / "metrics.jsonl"
    rows = []
    for line in path.read_text().splitlines():
        if line.strip():
            rows.append({k: (float(v) if v in ("inf", "-inf", "nan") else v) for k, v in json.loads(line).items()})
    return rows


def console_line(step: int, total: int, m: dict) -> str:
    """A compact one-line summary of a step."""
    def g(key, fmt):
        v = m.get(key)
        return "-" if v is None else format(v, fmt)

    return (
        f"step {step}/{total}  acc {g('rollout/accuracy', '.3f')}  len {g('rollout/response_length_mean', '.0f')}  "
        f"k3 {g('mismatch/k3', '.2e')}  loss {g('policy/loss', '+.4f')}  gnorm {g('learner/grad_norm', '.3f')}  "
        f"scale {g('precision/loss_scale', '.0f')}  skipped {g('precision/skipped_steps', '.0f')}  "
        f"{g('perf/step_seconds', '.1f')}s"
    )


def plot_runs(run_dirs: list[str | Path], metrics: list[str], out: str | Path, labels: list[str] | None = None,
              smooth: int = 1, log_scale: list[str] | None = None) -> Path:
    """One panel per metric, one curve per run, against step. Saves a PNG and returns its path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    log_scale = log_scale or []
    fig, axes = plt.subplots(1, len(metrics), figsize=(5 * len(metrics), 3.6), squeeze=False)
    for i, run in enumerate(run_dirs):
        rows = read_metrics(run)
        label = labels[i] if labels else Path(run).name
        for ax, key in zip(axes[0], metrics):
            pts = [(r["step"], r[key]) for r in rows if isinstance(r.get(key), (int, float))]
            if not pts:
                continue
            xs, ys = zip(*pts)
            if smooth > 1:
                ys = [sum(ys[max(0, j - smooth + 1): j + 1]) / len(ys[max(0, j - smooth + 1): j + 1]) for j in range(len(ys))]
            ax.plot(xs, ys, label=label)
    for ax, key in zip(axes[0], metrics):
        ax.set_title(key)
        ax.set_xlabel("step")
        if key in log_scale:
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out
