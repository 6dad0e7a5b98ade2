"""`make bench`: run each bench/bench_*.py in one process and write one JSON of figures.

Every benchmark measures `wb` and its baseline in the same run, on the same machine and data, and
returns {"figures": {...}, "targets": {name: {"value", "target", "met"}}}.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

import workbench


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=Path("bench/out/bench.json"))
    parser.add_argument("--only", nargs="*", help="bench names to run, e.g. checksum recover")
    parser.add_argument("--work", type=Path, default=None, help="scratch folder (default: a temp dir)")
    args = parser.parse_args()
    names = sorted(p.stem.removeprefix("bench_") for p in Path(__file__).parent.glob("bench_*.py"))
    if args.only:
        names = [n for n in names if n in args.only]
    work = Path(tempfile.mkdtemp(prefix="wb-bench-", dir=args.work))
    results: dict[str, dict] = {}
    try:
        for name in names:
            print(f"bench {name} ...", file=sys.stderr, flush=True)
            started = time.perf_counter()
            folder = work / name
            folder.mkdir()
            try:
                results[name] = importlib.import_module(f"bench.bench_{name}").run(folder)
            except Exception as exc:  # noqa: BLE001 - one failed bench must not hide the others
                results[name] = {"error": f"{type(exc).__name__}: {exc}"}
            results[name]["bench_seconds"] = round(time.perf_counter() - started, 1)
            shutil.rmtree(folder, ignore_errors=True)
            _print_summary(name, results[name])
    finally:
        shutil.rmtree(work, ignore_errors=True)
    report = {
        "wb_version": workbench.__version__,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "results": results,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}", file=sys.stderr)
    return 0


def _print_summary(name: str, result: dict) -> None:
    if "error" in result:
        print(f"  {name}: ERROR {result['error']}", file=sys.stderr)
        return
    for target, entry in result.get("targets", {}).items():
        mark = "met" if entry["met"] else "MISSED"
        print(f"  {name}.{target}: {entry['value']} (target {entry['target']}) {mark}", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
