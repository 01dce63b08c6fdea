"""Replace one generated section of a Markdown file, between `<!-- NAME:begin -->` and `<!-- NAME:end -->`."""

from __future__ import annotations

from pathlib import Path

DOC = Path(__file__).resolve().parents[1] / "docs" / "reliability.md"


def replace_section(name: str, text: str, path: Path = DOC) -> None:
    begin, end = f"<!-- {name}:begin -->", f"<!-- {name}:end -->"
    doc = path.read_text() if path.exists() else ""
    block = f"{begin}\n{text.rstrip()}\n{end}"
    if begin in doc and end in doc:
        head, rest = doc.split(begin, 1)
        doc = head + block + rest.split(end, 1)[1]
    else:
        doc = doc.rstrip() + "\n\n" + block + "\n"
    path.write_text(doc)


def machine_description() -> str:
    """CPU model, cores, memory, load average and torch version of this machine, in one line."""
    import os
    import platform

    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
        mem_kb = next(int(x.split()[1]) for x in Path("/proc/meminfo").read_text().splitlines() if x.startswith("MemTotal"))
        mem = f"{mem_kb / 2**20:.0f} GiB"
    except (OSError, StopIteration):
        mem = "unknown memory"
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg()) if hasattr(os, "getloadavg") else "n/a"
    gpu = f", GPU {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ""
    return f"{cpu}, {os.cpu_count()} cores, {mem}{gpu}; torch {torch.__version__}; load average {load} at the start"


def write_section(path: Path, name: str, title: str, lines: list[str], machine: str) -> None:
    """Replace section `name` of the Markdown file `path` with a `## title` heading, the machine and `lines`."""
    if not path.exists():
        path.write_text("# Benchmarks\n\nEach section is written by the script its command names.\n")
    replace_section(name, "\n".join([f"## {title}", "", f"Machine: {machine}.", "", *lines]), path)


def bench_parser(description: str):
    """An argument parser with the options every benchmark shares: --threads, --quick and --doc."""
    import argparse

    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: PyTorch's default)")
    ap.add_argument("--quick", action="store_true", help="a run of under a minute")
    ap.add_argument("--doc", default=str(Path(__file__).resolve().parents[1] / "docs" / "benchmarks.md"))
    return ap


def parse_bench_args(ap, quick: dict):
    """Parse; with --quick, apply the `quick` settings; with --threads, set torch's thread count."""
    args = ap.parse_args()
    if args.quick:
        for key, value in quick.items():
            setattr(args, key, value)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    return args
