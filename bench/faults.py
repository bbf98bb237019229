"""Fault-injection report: runs the fault suite and prints one line per scenario.

Usage: ``.venv/bin/python bench/faults.py [--markdown] [PYTEST_ARGS...]``

Runs ``pytest tests/test_faults.py tests/test_faults_process.py`` with ``FAULTS_REPORT``
pointing at a temporary file; each test appends its scenario's outcome there (inputs,
expected final states, observed final states, input files lost: modified, removed, or left
without a ledger record). Prints the table, the pytest result and the wall time; exits with
pytest's exit code, or 1 when any scenario lost a file.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SUITE = ("tests/test_faults.py", "tests/test_faults_process.py")
COLUMNS = ("scenario", "inputs", "expected", "observed", "lost")


def run_suite(extra: list[str]) -> tuple[int, list[dict[str, object]], str, float]:
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "faults.jsonl"
        env = {**os.environ, "FAULTS_REPORT": str(report)}
        start = time.monotonic()
        proc = subprocess.run(
            [sys.executable, "-m", "pytest", "-q", "-p", "no:warnings", *SUITE, *extra],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
        )
        elapsed = time.monotonic() - start
        rows = (
            [json.loads(line) for line in report.read_text().splitlines()]
            if report.exists()
            else []
        )
    summary = next(
        (line for line in reversed(proc.stdout.splitlines()) if " in " in line), proc.stdout[-500:]
    )
    if proc.returncode != 0:
        print(proc.stdout[-4000:], file=sys.stderr)
    return proc.returncode, rows, summary.strip("= "), elapsed


def print_table(rows: list[dict[str, object]], markdown: bool) -> None:
    rows = [{k: " ".join(str(v).split()) for k, v in row.items()} for row in rows]
    if markdown:
        print("| " + " | ".join(COLUMNS) + " |")
        print("|" + "---|" * len(COLUMNS))
        for row in rows:
            print("| " + " | ".join(str(row[c]).replace("|", "/") for c in COLUMNS) + " |")
        return
    for row in rows:
        print(
            f"{row['scenario']}: inputs: {row['inputs']} | expected: {row['expected']} | "
            f"observed: {row['observed']} | lost: {row['lost']}"
        )


def _order(row: dict[str, object]) -> tuple[int, str]:
    """Scenarios by their number (``"7b ..."`` -> 7), unnumbered ones last."""
    name = str(row["scenario"])
    digits = name[: len(name) - len(name.lstrip("0123456789"))]
    return (int(digits) if digits else 99, name)


def main(argv: list[str]) -> int:
    markdown = "--markdown" in argv
    extra = [a for a in argv if a != "--markdown"]
    code, rows, summary, elapsed = run_suite(extra)
    print_table(sorted(rows, key=_order), markdown)
    lost = sum(int(str(r["lost"])) for r in rows)
    print(f"\n{len(rows)} scenarios, files lost: {lost}; pytest: {summary}; wall {elapsed:.0f} s")
    return code or (1 if lost else 0)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
