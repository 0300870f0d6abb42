"""Pool the results.json files of several `bench policies` comparisons into one table and one pair of figures.

`bench policies` writes results.json (``summary`` and ``runs``: one record per trained and evaluated (entry, training
seed, NFE)) into its ``policies.out`` folder and tabulates the runs it finds there. Entries evaluated on another
machine, in another session or into another folder (e.g. a new variant measured beside a committed comparison) are
pooled here from their results.json files, with the same pooling (Wilson interval over all episodes of all training
seeds), table and figures as the bench itself (shortcut_policy.bench.policies.aggregate / table_markdown / plot).

usage: python scripts/merge_bench_results.py A/results.json B/results.json ... --out DIR [--entries e1,e2]
Writes DIR/summary.json (the pooled rows and the input files they came from; the per-episode runs stay in the inputs,
not copied), DIR/table.md, DIR/success_vs_nfe.png and DIR/success_vs_latency.png (each through a temporary file).
Raises SystemExit when an input is missing or not a bench results file, when two inputs hold the same (entry,
training seed, NFE) run (a run is pooled once), when the inputs are of different tasks, or when --out is one
of the inputs' folders.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from shortcut_policy.bench.policies import aggregate, plot, run_key, table_markdown
from shortcut_policy.utils import atomic_write_text


def merge(paths: list[Path], entries: list[str] | None = None) -> dict:
    """The runs of every results.json in ``paths`` (optionally only ``entries``), pooled: {"summary", "runs"}.
    Raises SystemExit naming the file for a missing or malformed input, a run found twice or mixed tasks."""
    runs, seen, tasks = [], {}, set()
    for p in paths:
        if not p.is_file():
            raise SystemExit(f"{p}: no such file (expected the results.json of a `bench policies` run)")
        try:
            data = json.loads(p.read_text())
        except json.JSONDecodeError as e:
            raise SystemExit(f"{p}: not JSON ({e})") from e
        if not isinstance(data, dict) or not isinstance(data.get("runs"), list) or "summary" not in data:
            raise SystemExit(f"{p}: expected a `bench policies` results.json with 'summary' and 'runs'")
        tasks.add(data["summary"].get("task"))
        for r in data["runs"]:
            if entries and r["entry"] not in entries:
                continue
            key = (r["entry"], int(r["train_seed"]), run_key(r))
            if key in seen:
                raise SystemExit(
                    f"{p}: run {key[0]} seed {key[1]} NFE {key[2]} is also in {seen[key]}: each run is pooled once"
                )
            seen[key] = p
            runs.append(r)
    if len(tasks) > 1:
        raise SystemExit(f"inputs of different tasks {sorted(map(str, tasks))}: pool runs of one task only")
    if not runs:
        raise SystemExit(f"no runs{' of entries ' + ','.join(entries) if entries else ''} in {[str(p) for p in paths]}")
    summary = aggregate(runs)
    summary["task"] = tasks.pop()
    summary["entries"] = sorted({r["entry"] for r in runs})
    summary["seeds"] = sorted({int(r["train_seed"]) for r in runs})
    summary["sources"] = [str(p) for p in paths]
    return {"summary": summary, "runs": runs}


def main(argv: list[str] | None = None) -> dict:
    """Command-line entry: merge, then write summary.json, table.md and the two figures into --out."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("inputs", nargs="+", type=Path, help="results.json files of `bench policies` runs")
    ap.add_argument("--out", type=Path, required=True, help="folder for the pooled summary.json, table.md, figures")
    ap.add_argument("--entries", default=None, help="comma-separated entries to keep (default: all)")
    a = ap.parse_args(argv)
    out = a.out.resolve()
    if any(p.resolve().parent == out for p in a.inputs):
        raise SystemExit(f"--out {a.out} holds one of the inputs: write the pooled table into another folder")
    merged = merge(a.inputs, a.entries.split(",") if a.entries else None)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "summary.json", json.dumps(merged["summary"], indent=1))
    table = table_markdown(merged["summary"])
    atomic_write_text(out / "table.md", table)
    plot(merged["summary"], out)
    print(table, end="")
    return merged


if __name__ == "__main__":
    main()
