"""Benchmark reports: one JSON document (machine, model, command, settings, results) and the same results
as a Markdown table and a rich table. Every benchmark (latency, load, kb, ...) builds its report here and
describes its table as a list of Columns.

A result row is a dict; a row with a "skipped" key (the reason) is a variant that did not run.
"""
from __future__ import annotations

import datetime
import json
import os
import platform
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

MISSING = "—"


@dataclass(frozen=True)
class Column:
    header: str
    key: str  # dotted path into a result row, e.g. "ttft_ms.median"
    fmt: Callable[[Any], str] = str


def percent(value: float) -> str:
    return f"{value:.1%}"


def fixed(digits: int) -> Callable[[float], str]:
    return lambda value: f"{value:.{digits}f}"


def cpu_model(cpuinfo: Path = Path("/proc/cpuinfo")) -> str:
    """The CPU's name, with its family/model numbers, clock and vector extensions where /proc/cpuinfo tells:
    the machines this project is measured on all call themselves "AMD EPYC", yet a Zen 4 and a Zen 5 differ
    by ~2x in some kernels, so result files must say which one they came from."""
    try:
        fields: dict[str, str] = {}
        for line in cpuinfo.read_text().splitlines():
            if not line.strip():
                break  # the first processor's block is enough
            key, _, value = line.partition(":")
            fields.setdefault(key.strip(), value.strip())
    except OSError:
        fields = {}
    if "model name" not in fields:
        return platform.processor() or platform.machine()  # not Linux: platform's answer is the best we have
    detail = [f"{label} {fields[key]}" for key, label in (("cpu family", "family"), ("model", "model"))
              if key in fields]
    if "cpu MHz" in fields:
        detail.append(f"{float(fields['cpu MHz']):.0f} MHz")
    flags = set(fields.get("flags", "").split())
    isa = "AVX-512" if "avx512f" in flags else "AVX2" if "avx2" in flags else None
    if isa:
        detail.append(isa + "".join(f" + {name}" for flag, name in (("avx512_bf16", "BF16"),
                                                                  ("avx512_vnni", "VNNI")) if flag in flags))
    return fields["model name"] + (f" ({', '.join(detail)})" if detail else "")


def code_version() -> str | None:
    """The git commit kuaida runs from ("abc1234" or "abc1234+dirty"); None outside a git checkout."""
    import subprocess

    root = Path(__file__).resolve().parents[2]
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True,
                                text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None  # an installed wheel, or no git: the package version alone says what ran
    return commit + ("+dirty" if dirty else "")


def machine_info(threads: int) -> dict[str, Any]:
    """Where a benchmark ran: enough to tell whether two result files are comparable."""
    import psutil
    import torch

    from kuaida import __version__

    return {
        "cpu": cpu_model(),
        "cores": psutil.cpu_count(logical=False),
        "logical_cpus": os.cpu_count(),
        "memory_gb": round(psutil.virtual_memory().total / 2**30, 1),
        "threads": threads,
        "os": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "kuaida": __version__,
        "git": code_version(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        # 1, 5, 15-minute load averages when the report is made: above the core count, other work
        # competed for the CPU during the run and the timings are pessimistic.
        "load_average": [round(x, 2) for x in os.getloadavg()],
    }


def command_line() -> str:
    """The command that is running, as a user would type it again (`kuaida bench latency ...`)."""
    return shlex.join([Path(sys.argv[0]).name, *sys.argv[1:]])


def make_report(benchmark: str, model: str, settings: dict[str, Any], results: list[dict[str, Any]],
                threads: int, command: str | None = None) -> dict[str, Any]:
    return {"benchmark": benchmark, "machine": machine_info(threads), "model": model,
            "command": command or command_line(), "settings": settings, "results": results}


def cell(row: dict[str, Any], column: Column) -> str:
    """One table cell: the row's value at the column's key, formatted; MISSING when absent."""
    value: Any = row
    for part in column.key.split("."):
        if not isinstance(value, dict) or value.get(part) is None:
            return MISSING
        value = value[part]
    return column.fmt(value)


def skipped(report: dict[str, Any]) -> list[str]:
    """'variant: reason' for each row that did not run."""
    return [f"{r.get('variant', '?')}: {r['skipped']}" for r in report["results"] if "skipped" in r]


def write_json(report: dict[str, Any], path: str | Path) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(report, indent=2) + "\n")


def markdown(report: dict[str, Any], columns: list[Column], title: str) -> str:
    m = report["machine"]
    lines = [
        f"# {title}", "",
        f"Model: `{report['model']}`  ",
        f"Machine: {m['cpu']}, {m['cores']} cores, {m['threads']} threads, torch {m['torch']}, {m['date']}, "
        f"load average {' / '.join(map(str, m['load_average']))}, kuaida {m['kuaida']} ({m['git']})  ",
        f"Command: `{report['command']}`  ",
        "Settings: " + ", ".join(f"{k}={json.dumps(v)}" for k, v in report["settings"].items()), "",
        "| " + " | ".join(c.header for c in columns) + " |",
        "| " + " | ".join("---" for _ in columns) + " |",
    ]
    lines += ["| " + " | ".join(cell(r, c) for c in columns) + " |" for r in report["results"]]
    notes = skipped(report)
    if notes:
        lines += ["", "Skipped:", *(f"- {n}" for n in notes)]
    return "\n".join(lines) + "\n"


def write_markdown(report: dict[str, Any], columns: list[Column], path: str | Path, title: str) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(markdown(report, columns, title))


def rich_table(report: dict[str, Any], columns: list[Column], title: str):
    """The results as a rich Table (skipped rows listed in its caption)."""
    from rich import box
    from rich.table import Table

    table = Table(title=title, caption="\n".join(f"skipped {n}" for n in skipped(report)) or None,
                  box=box.SIMPLE_HEAD)
    for i, c in enumerate(columns):
        # Never narrower than the header's longest word: a narrow terminal wraps headers, not words.
        table.add_column(c.header, justify="left" if i == 0 else "right",
                         min_width=max(len(word) for word in c.header.split()))
    for r in report["results"]:
        table.add_row(*(cell(r, c) for c in columns))
    return table
