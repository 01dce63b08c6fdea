"""Metrics sinks (JSONL always; TensorBoard, Weights & Biases, MLflow as `run.loggers` asks), decoded samples,
console lines, and figures."""

from __future__ import annotations

import importlib
import importlib.util
import json
import math
import netrc
import os
import urllib.error
import urllib.parse
import urllib.request
import uuid
from pathlib import Path

from unison.checkpoint import append_jsonl
from unison.errors import TrackerError, UserError
from unison.runfolder import nearest_existing, read_jsonl


def _clean(value):
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


def flatten(d: dict, prefix: str = "") -> dict:
    """A nested config as {dotted.key: value}."""
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def samples_markdown(rows: list[dict]) -> str:
    """Decoded samples as a Markdown table (TensorBoard's text panel renders it)."""

    def cell(text) -> str:
        return str(text).replace("|", "\\|").replace("\n", "<br>")

    lines = [
        "| id | reward | length | finished | mismatch | prompt | response |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    lines += [
        f"| {cell(r['id'])} | {r['reward']:.3g} | {r['length']} | {r['finished']} | {r['mismatch']:.2e} | "
        f"{cell(r['prompt'])} | {cell(r['response'])} |"
        for r in rows
    ]
    return "\n".join(lines)


class TensorBoardSink:
    def __init__(self, run_dir: Path, config: dict, ids: dict):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(Path(run_dir) / "tensorboard"))
        self.writer.add_text("config", "\n".join(f"    {k}: {v}" for k, v in flatten(config).items()), 0)

    def scalars(self, step: int, metrics: dict) -> None:
        for key, value in metrics.items():
            if isinstance(value, (int, float)) and math.isfinite(value):
                self.writer.add_scalar(key, value, step)

    def samples(self, step: int, rows: list[dict]) -> None:
        self.writer.add_text("samples", samples_markdown(rows), step)

    def close(self) -> None:
        self.writer.close()


class WandbSink:
    """Weights & Biases, offline unless WANDB_MODE says otherwise (`wandb sync` uploads an offline run); a resumed
    run continues the same W&B run."""

    def __init__(self, run_dir: Path, config: dict, ids: dict):
        import wandb

        self.wandb = wandb
        ids.setdefault("wandb", uuid.uuid4().hex[:8])
        self.run = wandb.init(
            project=os.environ.get("WANDB_PROJECT", "unison"),
            dir=str(run_dir),
            name=Path(run_dir).name,
            id=ids["wandb"],
            resume="allow",
            config=flatten(config),
            mode=os.environ.get("WANDB_MODE", "offline"),
        )

    def scalars(self, step: int, metrics: dict) -> None:
        self.run.log({k: v for k, v in metrics.items() if isinstance(v, (int, float))}, step=step)

    def samples(self, step: int, rows: list[dict]) -> None:
        if rows:
            columns = list(rows[0])
            table = self.wandb.Table(columns=columns, data=[[r[c] for c in columns] for r in rows])
            self.run.log({"samples": table}, step=step)

    def close(self) -> None:
        self.run.finish()


class MlflowSink:
    """MLflow: a file store in the run folder (`mlruns/`) unless MLFLOW_TRACKING_URI names a server; a resumed run
    continues the same MLflow run."""

    def __init__(self, run_dir: Path, config: dict, ids: dict):
        import mlflow

        self.mlflow = mlflow
        if mlflow_file_store(run_dir) is not None:
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3 keeps its file store opt-in
        # set each time: MLflow keeps the last one set in the process above the environment's
        default = (Path(run_dir) / "mlruns").absolute().as_uri()
        mlflow.set_tracking_uri(os.environ.get("MLFLOW_TRACKING_URI") or default)
        mlflow.set_experiment(os.environ.get("MLFLOW_EXPERIMENT_NAME", "unison"))
        self.run = mlflow.start_run(
            run_id=ids.get("mlflow"), run_name=None if ids.get("mlflow") else Path(run_dir).name
        )
        if "mlflow" not in ids:
            ids["mlflow"] = self.run.info.run_id
            mlflow.log_params({k: str(v)[:500] for k, v in flatten(config).items()})

    def scalars(self, step: int, metrics: dict) -> None:
        # MLflow names take letters, digits and _ - . : / and spaces: `eval/pass@4` is logged as `eval/pass_at_4`
        clean = {
            k.replace("@", "_at_"): float(v)
            for k, v in metrics.items()
            if isinstance(v, (int, float)) and math.isfinite(v)
        }
        self.mlflow.log_metrics(clean, step=step)

    def samples(self, step: int, rows: list[dict]) -> None:
        self.mlflow.log_text(json.dumps(rows, indent=1), f"samples/step-{step:06d}.json")

    def close(self) -> None:
        self.mlflow.end_run()


# run.loggers: name -> (its sink, the module it needs, the extra that installs it)
LOGGERS = {
    "jsonl": (None, None, None),  # metrics.jsonl, always written; alone: no other sink
    "tensorboard": (TensorBoardSink, "tensorboard", "tensorboard"),
    "wandb": (WandbSink, "wandb", "wandb"),
    "mlflow": (MlflowSink, "mlflow", "mlflow"),
}


def resolve_loggers(names: list[str]) -> list[str]:
    """The loggers to start: those asked for, each installed (a UserError naming the extra otherwise); none asked
    for: tensorboard where it is installed."""

    if not names:
        return ["tensorboard"] if importlib.util.find_spec("tensorboard") is not None else []
    names = [n for n in names if n != "jsonl"]
    for name in names:
        _, module, extra = LOGGERS[name]
        if importlib.util.find_spec(module) is None:
            raise UserError(
                f"run.loggers asks for {name}, which is not installed; install it with: "
                f"pip install 'unison[{extra}]' (or pip install {module}), "
                "or drop it from run.loggers"
            )
    return list(dict.fromkeys(names))


def check_trackers(names: list[str], run_dir: str | Path) -> None:
    """What can be known before a tracker starts, checked without writing anything: each imports, W&B online has
    an API key, MLflow's store (MLFLOW_TRACKING_URI) is a writable folder or a server that answers. A UserError
    says what to do."""
    for name in names:
        _, module, extra = LOGGERS[name]
        try:
            importlib.import_module(module)
        except Exception as exc:  # noqa: BLE001 - a broken install raises anything
            first = (str(exc).strip().splitlines() or [""])[0][:200]
            raise UserError(
                f"run.loggers asks for {name}, which is installed but fails to import ({type(exc).__name__}: "
                f"{first}); reinstall it (pip install --force-reinstall 'unison[{extra}]') or drop it from "
                "run.loggers"
            ) from None
    if "wandb" in names:
        check_wandb_key()
    if "mlflow" in names:
        check_mlflow_store(run_dir)


def check_wandb_key() -> None:
    """W&B online needs an API key: WANDB_API_KEY, an identity token, or `wandb login`'s entry in ~/.netrc."""
    if os.environ.get("WANDB_MODE", "offline") not in ("online", "run"):
        return
    if os.environ.get("WANDB_API_KEY") or os.environ.get("WANDB_IDENTITY_TOKEN_FILE"):
        return
    host = urllib.parse.urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname
    try:
        found = netrc.netrc(os.environ.get("NETRC") or None).authenticators(host or "")
    except (OSError, netrc.NetrcParseError):
        found = None
    if not found:
        raise UserError(
            f"run.loggers asks for wandb online (WANDB_MODE={os.environ['WANDB_MODE']}) and no W&B API key is "
            "configured; run `wandb login` or set WANDB_API_KEY, or unset WANDB_MODE to log offline "
            "(`wandb sync` uploads later)"
        )


def mlflow_file_store(run_dir: str | Path) -> Path | None:
    """The folder of MLflow's file store: MLFLOW_TRACKING_URI's (a file:// URI or a path), or the run folder's
    mlruns/ where it is unset; None for a server or a database."""
    uri = os.environ.get("MLFLOW_TRACKING_URI", "")
    if not uri:
        return Path(run_dir) / "mlruns"
    parsed = urllib.parse.urlparse(uri)
    if parsed.scheme == "file":
        return Path(urllib.parse.unquote(parsed.path))
    return Path(uri).expanduser() if not parsed.scheme else None


def check_mlflow_store(run_dir: str | Path) -> None:
    """MLflow's store, before the run starts: a file store whose folder can be made and written, or a tracking
    server that answers its health check within 5 s (MLflow itself retries for minutes)."""
    uri = os.environ.get("MLFLOW_TRACKING_URI", "")
    store = mlflow_file_store(run_dir)
    how = "or unset MLFLOW_TRACKING_URI (a file store in the run folder), or drop mlflow from run.loggers"
    if store is not None and uri:
        parent = nearest_existing(store.absolute())
        if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK) or (store.exists() and not store.is_dir()):
            raise UserError(
                f"MLFLOW_TRACKING_URI={uri} names the file store {str(store)!r}, which cannot be made or written "
                f"({str(parent)!r} is {'not a folder' if not parent.is_dir() else 'not writable'}); "
                f"point it at a writable folder, {how}"
            )
    if urllib.parse.urlparse(uri).scheme in ("http", "https"):
        try:
            with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=5):
                pass
        except (urllib.error.URLError, OSError, ValueError) as exc:
            why = getattr(exc, "reason", None) or exc
            raise UserError(
                f"the MLflow tracking server MLFLOW_TRACKING_URI={uri} does not answer ({why}); start it, {how}"
            ) from None


class MetricsLog:
    """Appends one JSON object per step to `metrics.jsonl`, and sends the same scalars (and each step's decoded
    samples) to the trackers of `run.loggers`, started with the run's config. Tracker run ids are kept in the run
    folder (`trackers.json`), so that a resumed run goes on logging into the same tracker runs. A tracker that
    fails, starting or logging, is a failed write (`TrackerError`)."""

    def __init__(self, run_dir: Path, loggers: list[str] | None = None, config: dict | None = None):
        self.path = Path(run_dir) / "metrics.jsonl"
        ids_file = Path(run_dir) / "trackers.json"
        ids = json.loads(ids_file.read_text()) if ids_file.is_file() else {}
        self.sinks: list[tuple[str, object]] = []
        for name in loggers or []:
            self.sinks.append((name, _tracked(name, lambda n=name: LOGGERS[n][0](Path(run_dir), config or {}, ids))))
        if ids:
            ids_file.write_text(json.dumps(ids) + "\n")

    def write(self, step: int, metrics: dict) -> None:
        append_jsonl(self.path, {"step": step, **{k: _clean(v) for k, v in metrics.items()}})
        for name, sink in self.sinks:
            _tracked(name, lambda sink=sink: sink.scalars(step, metrics))

    def samples(self, step: int, rows: list[dict]) -> None:
        for name, sink in self.sinks:
            _tracked(name, lambda sink=sink: sink.samples(step, rows))

    def close(self, quiet: bool = False) -> None:
        """Close every tracker; the first that fails is raised after all were closed (not with `quiet`: a run that
        is already failing keeps its own error)."""
        failed = None
        for name, sink in self.sinks:
            try:
                _tracked(name, sink.close)
            except TrackerError as exc:
                failed = failed or exc
        if failed is not None and not quiet:
            raise failed


def _tracked(name: str, call):
    """`call()`, whose failure is the tracker `name`'s failed write."""
    try:
        return call()
    except Exception as exc:  # noqa: BLE001 - each tracker raises its own kinds
        raise TrackerError(name, exc) from exc


def read_samples(run_dir: str | Path) -> dict[int, list[dict]]:
    """{step: decoded rows} from a run folder's samples.jsonl (steps logged before rows were kept have none); a
    torn last line is left out with a notice, a line before it that is not JSON is a UserError."""

    path = Path(run_dir) / "samples.jsonl"
    if not path.is_file():
        raise UserError(f"{str(run_dir)!r} has no samples.jsonl; give a run folder written by `unison train`")
    rows, bad = read_jsonl(path)
    if bad is not None:
        raise UserError(f"{path}: line {bad} is not a JSON object; give a run folder written by `unison train`")
    return {int(row["step"]): row["rows"] for row in rows if row.get("rows") and "step" in row}


def format_samples(step: int, rows: list[dict]) -> str:
    """A step's decoded samples as text, one block per sample."""
    blocks = [f"step {step}: {len(rows)} samples"]
    for r in rows:
        blocks.append(
            f"--- {r['id'] or 'sample'} | reward {r['reward']:.3g} | {r['length']} tokens | "
            f"{'finished' if r['finished'] else 'cut at max_new_tokens'} | mismatch {r['mismatch']:.2e}\n"
            f"[prompt]\n{r['prompt']}\n[response]\n{r['response']}"
        )
    return "\n".join(blocks)


def read_metrics(run_dir: str | Path) -> list[dict]:
    """The rows of a run folder's metrics.jsonl; a torn last line is left out with a notice on stderr, a line before
    it that is not a JSON object is a ValueError."""
    path = Path(run_dir) / "metrics.jsonl"
    rows, bad = read_jsonl(path)
    if bad is not None:
        raise ValueError(f"{path}: line {bad} is not a JSON object")
    return [{k: (float(v) if v in ("inf", "-inf", "nan") else v) for k, v in row.items()} for row in rows]


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


def plot_runs(
    run_dirs: list[str | Path],
    metrics: list[str],
    out: str | Path,
    labels: list[str] | None = None,
    smooth: int = 1,
    log_scale: list[str] | None = None,
    rows: list[list[dict]] | None = None,
) -> Path:
    """One panel per metric, one curve per run, against step (each run's `rows` where given, else its
    metrics.jsonl). Saves a PNG and returns its path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    log_scale = log_scale or []
    fig, axes = plt.subplots(1, len(metrics), figsize=(5 * len(metrics), 3.6), squeeze=False)
    for i, run in enumerate(run_dirs):
        run_rows = rows[i] if rows is not None else read_metrics(run)
        label = labels[i] if labels else Path(run).name
        for ax, key in zip(axes[0], metrics):
            pts = [(r["step"], r[key]) for r in run_rows if isinstance(r.get(key), (int, float))]
            if not pts:
                continue
            xs, ys = zip(*pts)
            if smooth > 1:
                ys = [
                    sum(ys[max(0, j - smooth + 1) : j + 1]) / len(ys[max(0, j - smooth + 1) : j + 1])
                    for j in range(len(ys))
                ]
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
