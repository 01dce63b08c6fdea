"""Replace one generated section of a Markdown file, between `<!-- NAME:begin -->` and `<!-- NAME:end -->`."""

from __future__ import annotations

from pathlib import Path

DOC = Path(__file__).resolve().parents[1] / "docs" / "reliability.md"


def replace_section(name: str, text: str, path: Path = DOC) -> None:
    """Replace (or append) section `name` of `path`, under an exclusive lock, so that benchmarks running side by side
    (one per core) each keep the sections the others wrote; the new text replaces the file in one rename. A section
    whose markers stand in the page's notes twin (`docs/notes/<page>`, where long tables and logs live) is replaced
    there."""
    import fcntl
    import os

    begin, end = f"<!-- {name}:begin -->", f"<!-- {name}:end -->"
    block = f"{begin}\n{text.rstrip()}\n{end}"
    notes = path.parent / "notes" / path.name
    if notes.exists() and begin in notes.read_text() and not (path.exists() and begin in path.read_text()):
        path = notes
    with open(path.with_name(path.name + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        doc = path.read_text() if path.exists() else ""
        if begin in doc and end in doc:
            head, rest = doc.split(begin, 1)
            doc = head + block + rest.split(end, 1)[1]
        else:
            doc = doc.rstrip() + "\n\n" + block + "\n"
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(doc)
        os.replace(tmp, path)


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
        mem_kb = next(
            int(x.split()[1]) for x in Path("/proc/meminfo").read_text().splitlines() if x.startswith("MemTotal")
        )
        mem = f"{mem_kb / 2**20:.0f} GiB"
    except (OSError, StopIteration):
        mem = "unknown memory"
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg()) if hasattr(os, "getloadavg") else "n/a"
    gpu = f", GPU {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ""
    return f"{cpu}, {os.cpu_count()} cores, {mem}{gpu}; torch {torch.__version__}; load average {load} at the start"


def write_section(path: str | None, name: str, title: str, lines: list[str], machine: str) -> None:
    """Replace section `name` of the Markdown file `path` with a `## title` heading, the machine and `lines`; with
    no path (a --quick run without --doc), print them instead."""
    if path is None:
        print("\n".join([f"## {title}", "", *lines, "", "(a --quick run: no document written; --doc FILE writes one)"]))
        return
    path = Path(path)
    if not path.exists():
        path.write_text("# Benchmarks\n\nEach section is written by the script its command names.\n")
    replace_section(name, "\n".join([f"## {title}", "", f"Machine: {machine}.", "", *lines]), path)


def bench_parser(description: str):
    """An argument parser with the options every benchmark shares: --threads, --quick and --doc."""
    import argparse

    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("--threads", type=whole, default=0, help="torch threads (0: PyTorch's default)")
    ap.add_argument("--quick", action="store_true", help="a run of under a minute")
    ap.add_argument(
        "--doc",
        default=None,
        help="the Markdown file to write the table into (default: "
        "docs/benchmarks.md; none for --quick, so a quick run leaves the measured tables as they are)",
    )
    return ap


def parse_bench_args(ap, quick: dict):
    """Parse; with --quick, apply the `quick` settings; with --threads, set torch's thread count."""
    args = ap.parse_args()
    if args.doc is None and not args.quick:
        args.doc = str(Path(__file__).resolve().parents[1] / "docs" / "benchmarks.md")
    if args.quick:
        for key, value in quick.items():
            setattr(args, key, value)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    return args


def listed(choices=None, kind=str, allow_empty: bool = False):
    """An argparse type for a comma-separated list (`fp32,bf16`, `16,64`) whose items must parse as `kind` and, when
    given, be among `choices`; argparse turns a bad list into one line and exit code 2."""
    import argparse

    def parse(text: str) -> list:
        try:
            items = [kind(x.strip()) for x in text.split(",") if x.strip()]
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of {kind.__name__}s") from None
        bad = [x for x in items if choices is not None and x not in choices]
        if bad or not (items or allow_empty):
            allowed = f"; choose from {', '.join(map(str, choices))}" if choices is not None else ""
            raise argparse.ArgumentTypeError(
                f"{text!r}: {'unknown ' + ', '.join(map(str, bad)) if bad else 'empty'}{allowed}"
            )
        return items

    parse.__name__ = "list"
    return parse


def joined(items) -> str:
    """A list option written back as it is typed on the command line."""
    return ",".join(map(str, items)) or "''"


def _at_least(low: int, name: str):
    def parse(text: str) -> int:
        value = int(text)
        if value < low:
            raise ValueError(text)
        return value

    parse.__name__ = name  # argparse names the type in its error: "invalid positive integer value: '0'"
    return parse


count = _at_least(1, "positive integer")  # a batch size, a length, a number of rounds
whole = _at_least(0, "non-negative integer")  # a number of warm-up steps; threads, where 0 means the default
