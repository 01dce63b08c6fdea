"""The conformance table: on a tiny random checkpoint of every architecture family (`unison.archs`), the rollout
engine's and the learner's fp32 log-probs against the model's own Hugging Face forward, the decode path, and the
fp16/bf16 engine-learner mismatch (`unison.conformance.measure`, the function tests/test_conformance.py checks).

    OMP_NUM_THREADS=1 python bench/conformance.py                 # native engine: docs/conformance.md and README
    OMP_NUM_THREADS=1 python bench/conformance.py --engine vllm   # the vLLM engine's section (vLLM installed)

Writes the section `conformance-<engine>` of docs/conformance.md and bench/results/conformance-<engine>.json, and
from the results of both engines the table of supported architectures in the README (section `architectures`).
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from docsection import bench_parser, listed, machine_description, replace_section  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


RESULTS = ROOT / "bench" / "results"


def fmt(x: float) -> str:
    return "0" if x == 0 else f"{x:.1e}"


def reason(message: str, folder: Path) -> str:
    """The why of a refusal, without the command advice and the temporary path."""
    text = message.replace(str(folder), "<checkpoint>")
    if " in unison: " in text:
        text = text.split(" in unison: ", 1)[1]
    return text.split("; use --engine", 1)[0].replace("|", "/")


def readme_table() -> str:
    """Supported architectures, from the results each engine's run left in bench/results."""
    import json

    results = {
        e: json.loads((RESULTS / f"conformance-{e}.json").read_text())
        for e in ("native", "vllm")
        if (RESULTS / f"conformance-{e}.json").exists()
    }
    native = results.get("native", {})
    vllm = results.get("vllm")

    def cell(row):
        if row is None:
            return "not measured"
        if row["status"] == "refused":
            return f"refused: {row['why']}"
        path = {"fast": "fast path", "fallback": "fallback"}.get(row["path"], "")
        if row["why"] and "fast-path family" not in row["why"]:
            path += f" ({row['why']})"
        return f"{path + ', ' if path else ''}{row['status']} (fp32 max {fmt(row['engine_max'])})"

    lines = ["| checkpoint | model_type | native engine | vLLM engine (CPU) |", "| --- | --- | --- | --- |"]
    for name, row in native.items():
        lines.append(
            f"| {name} | {row.get('model_type', '-')} | {cell(row)} | "
            f"{cell(vllm.get(name)) if vllm is not None else 'not measured'} |"
        )
    return "\n".join(lines)


def main() -> int:
    import torch

    from unison.archs import ARCHS, save_tiny
    from unison.conformance import MAX_TOL, MEAN_TOL, default_prompts, measure

    ap = bench_parser(__doc__.splitlines()[0])
    ap.add_argument("--engine", default="native", choices=("native", "vllm"))
    ap.add_argument("--archs", type=listed(sorted(ARCHS)), default=sorted(ARCHS))
    ap.add_argument("--max-new-tokens", type=int, default=24)
    args = ap.parse_args()
    precisions = ("bf16",) if args.engine == "vllm" else ("fp16", "bf16")  # vLLM refuses fp16 for Gemma
    if args.threads:
        torch.set_num_threads(args.threads)
    doc = Path(args.doc) if args.doc else ROOT / "docs" / "conformance.md"
    extra = {"kv_cache_memory_bytes": 2**26} if args.engine == "vllm" else {}
    # vLLM-CPU's attention takes head sizes 32, 64, 80, ...: its checkpoints have 2 heads of 32 (1 key/value head)
    shape = dict(num_attention_heads=2, num_key_value_heads=1, head_dim=32) if args.engine == "vllm" else {}
    machine = machine_description()
    work = Path(tempfile.mkdtemp(prefix="unison-conformance-"))
    rows, results, bad = [], {}, 0
    for name in args.archs:
        t0 = time.perf_counter()
        d = save_tiny(name, work / name, **({"n_head": 2} if name == "gpt2" and shape else shape))
        try:
            r = measure(
                d,
                default_prompts(),
                max_new_tokens=args.max_new_tokens,
                precisions=precisions,
                engine=args.engine,
                **extra,
            )
        except Exception as exc:  # noqa: BLE001 - a refused or failing architecture is a row of the table
            first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            why = reason(first, d)
            rows.append(f"| {name} | - | refused: {why} | | | | | | |")
            results[name] = {"status": "refused", "why": why}
            print(f"{name}: {first}", flush=True)
            continue
        ok = r.exact and r.ordered
        bad += not ok
        path = r.decode_path + (f" ({r.reason})" if r.reason else "")
        fp16 = r.mismatch.get("fp16")
        ratio = f"{r.mismatch['bf16'] / fp16:.1f}" if fp16 else "-"
        rows.append(
            f"| {name} | {r.model_type} | {path} | {fmt(r.engine_vs_hf[0])} / {fmt(r.engine_vs_hf[1])} | "
            f"{fmt(r.learner_vs_hf[0])} / {fmt(r.learner_vs_hf[1])} | {fmt(r.mismatch['fp32'])} | "
            f"{fmt(fp16) if fp16 is not None else '-'} | {fmt(r.mismatch['bf16'])} | {ratio} |"
        )
        results[name] = {
            "status": "exact" if ok else "NOT EXACT",
            "model_type": r.model_type,
            "path": r.decode_path,
            "why": r.reason,
            "engine_mean": r.engine_vs_hf[0],
            "engine_max": r.engine_vs_hf[1],
            "learner_mean": r.learner_vs_hf[0],
            "learner_max": r.learner_vs_hf[1],
            "mismatch": r.mismatch,
        }
        print(
            f"{name}: {path}, engine {r.engine_vs_hf}, learner {r.learner_vs_hf}, {r.mismatch} "
            f"({time.perf_counter() - t0:.1f} s){'' if ok else '  NOT EXACT'}",
            flush=True,
        )
    lines = [
        f"## {args.engine} engine",
        "",
        f"`OMP_NUM_THREADS=1 python bench/conformance.py{' --engine vllm' if args.engine == 'vllm' else ''}`; "
        f"machine: {machine}. Each row: a tiny random checkpoint of `unison.archs`"
        f"{' with 2 attention heads of 32 (vLLM-CPU attends with head sizes 32, 64, ...)' if shape else ''} "
        f"({len(default_prompts())} "
        f"prompts of 12-20 tokens, {args.max_new_tokens} new tokens each, temperature 1), sampled by the engine in "
        f"fp32; its log-probs and the learner's recompute held against the model's own forward "
        f"(`model(ids).logits`, one row at a time, fp32). Contract: mean <= {MEAN_TOL:g}, max <= {MAX_TOL:g}. "
        f"Then mean |log pi - log mu| with both engines in fp32, fp16 and bf16. {len(rows) - bad} of {len(rows)} "
        "rows meet the contract.",
        "",
        "| checkpoint | model_type | decode path | engine vs HF, fp32 mean / max | learner vs HF, fp32 mean / max "
        "| mismatch fp32 | fp16 | bf16 | bf16 / fp16 |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
        *rows,
    ]
    if not doc.exists():
        doc.write_text("# Conformance\n")
    replace_section(f"conformance-{args.engine}", "\n".join(lines), doc)
    if len(args.archs) == len(ARCHS):
        import json

        RESULTS.mkdir(exist_ok=True)
        (RESULTS / f"conformance-{args.engine}.json").write_text(json.dumps(results, indent=1) + "\n")
        replace_section("architectures", readme_table(), ROOT / "README.md")
    print(f"wrote {doc}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
