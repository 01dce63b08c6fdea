"""The conformance table: on a tiny random checkpoint of every architecture family (`unison.archs`), the rollout
engine's and the learner's fp32 log-probs against the model's own Hugging Face forward, the decode path, and the
fp16/bf16 engine-learner mismatch (`unison.conformance.measure`, the function tests/test_conformance.py checks).

    OMP_NUM_THREADS=1 python bench/conformance.py                 # native engine: docs/conformance.md and README
    OMP_NUM_THREADS=1 python bench/conformance.py --engine vllm   # the vLLM engine's section (vLLM installed)

Writes the section `conformance-<engine>` of docs/conformance.md, and with the native engine the table of
supported architectures in the README (section `architectures`).
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from docsection import bench_parser, listed, machine_description, replace_section  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def fmt(x: float) -> str:
    return "0" if x == 0 else f"{x:.1e}"


def main() -> int:
    import torch

    from unison.archs import ARCHS, save_tiny
    from unison.conformance import MAX_TOL, MEAN_TOL, default_prompts, measure

    ap = bench_parser(__doc__.splitlines()[0])
    ap.add_argument("--engine", default="native", choices=("native", "vllm"))
    ap.add_argument("--archs", type=listed(sorted(ARCHS)), default=sorted(ARCHS))
    ap.add_argument("--max-new-tokens", type=int, default=24)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    doc = Path(args.doc) if args.doc else ROOT / "docs" / "conformance.md"
    extra = {"kv_cache_memory_bytes": 2**26} if args.engine == "vllm" else {}
    machine = machine_description()
    work = Path(tempfile.mkdtemp(prefix="unison-conformance-"))
    rows, readme, bad = [], [], 0
    for name in args.archs:
        t0 = time.perf_counter()
        d = save_tiny(name, work / name)
        try:
            r = measure(d, default_prompts(), max_new_tokens=args.max_new_tokens, engine=args.engine, **extra)
        except Exception as exc:  # noqa: BLE001 - a refused or failing architecture is a row of the table
            first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            rows.append(f"| {name} | - | refused: {first} | | | | | | |")
            readme.append((name, "refused", first))
            print(f"{name}: {first}", flush=True)
            continue
        ok = r.exact and all(v == v for v in r.mismatch.values())
        bad += not ok
        path = r.decode_path + (f" ({r.reason})" if r.reason else "")
        ratio = r.mismatch["bf16"] / r.mismatch["fp16"] if r.mismatch.get("fp16") else float("nan")
        rows.append(f"| {name} | {r.model_type} | {path} | {fmt(r.engine_vs_hf[0])} / {fmt(r.engine_vs_hf[1])} | "
                    f"{fmt(r.learner_vs_hf[0])} / {fmt(r.learner_vs_hf[1])} | {fmt(r.mismatch['fp32'])} | "
                    f"{fmt(r.mismatch['fp16'])} | {fmt(r.mismatch['bf16'])} | {ratio:.1f} |")  # fmt: skip
        readme.append((name, r.decode_path, r.reason))
        print(f"{name}: {path}, engine {r.engine_vs_hf}, learner {r.learner_vs_hf}, {r.mismatch} "
              f"({time.perf_counter() - t0:.1f} s){'' if ok else '  NOT EXACT'}", flush=True)
    lines = [
        f"## {args.engine} engine", "",
        f"`OMP_NUM_THREADS=1 python bench/conformance.py{' --engine vllm' if args.engine == 'vllm' else ''}`; "
        f"machine: {machine}. Each row: a tiny random checkpoint of `unison.archs` ({len(default_prompts())} "
        f"prompts of 12-20 tokens, {args.max_new_tokens} new tokens each, temperature 1), sampled by the engine in "
        f"fp32; its log-probs and the learner's recompute held against the model's own forward "
        f"(`model(ids).logits`, one row at a time, fp32). Contract: mean <= {MEAN_TOL:g}, max <= {MAX_TOL:g}. "
        f"Then mean |log pi - log mu| with both engines in fp32, fp16 and bf16. {len(rows) - bad} of {len(rows)} "
        "rows meet the contract.", "",
        "| checkpoint | model_type | decode path | engine vs HF, fp32 mean / max | learner vs HF, fp32 mean / max "
        "| mismatch fp32 | fp16 | bf16 | bf16 / fp16 |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |", *rows,
    ]  # fmt: skip
    if not doc.exists():
        doc.write_text("# Conformance\n")
    replace_section(f"conformance-{args.engine}", "\n".join(lines), doc)
    if args.engine == "native" and len(args.archs) == len(ARCHS):
        table = ["| checkpoint | native engine | why the fallback |", "| --- | --- | --- |"]
        table += [f"| {n} | {p} | {why} |" for n, p, why in readme]
        replace_section("architectures", "\n".join(table), ROOT / "README.md")
    print(f"wrote {doc}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
