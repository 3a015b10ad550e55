"""Runs several configs over several seeds with one labelled set and step budget; tabulates.

  python benchmarks/ablate.py --out=benchmarks/out/semi_1of16 --seeds=0,1,2 \
      --set data.labelled_fraction=0.0625 --set total_steps=1500 \
      --run supervised=configs/shapes_supervised.py \
      --run fixmatch=configs/shapes_fixmatch.py \
      --run unimatch=configs/shapes_unimatch.py \
      --run unimatch_v2=configs/shapes_unimatch_v2.py

A run is `LABEL=CONFIG [key=value ...]` (overrides for that run only); `--set key=value`
applies to every run. The labelled set is fixed by `data.split_seed` (not by the training
seed), so every run of a table trains on the same labelled images. Each run is one
`python -m s4jax.main` in `<out>/runs/<label>_seed<k>`; finished runs are reused, so an
interrupted ablation continues where it stopped.

Writes `<out>/results.md`, `<out>/results.csv` (one row per run and a summary per label)
and `<out>/miou.png` (teacher mIoU over steps, mean over seeds), and prints the table.
Spread is the sample standard deviation over seeds.
"""

import argparse
import csv
import json
import os
import subprocess
import sys
import time

import numpy as np

from s4jax import logs

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def parse_run(text):
  label, _, rest = text.partition("=")
  parts = rest.split()
  if not label or not parts:
    raise SystemExit(f"--run {text!r}: expected LABEL=CONFIG [key=value ...]")
  return label, parts[0], parts[1:]


def read_metrics(workdir):
  """The run's metrics, one row per step and kind: rows of a segment that a resumed run
  replaced (kept by older versions) are left out, so curves and "final" are the run's."""
  path = os.path.join(workdir, "metrics.jsonl")
  if not os.path.exists(path):
    return []
  return logs.read_metrics(path)


def summarise_run(records, total_steps):
  evals = [r for r in records if r.get("eval/teacher_miou") is not None]
  if not evals or evals[-1]["step"] != total_steps:
    return None
  final = evals[-1]
  return {
    "final_student": 100 * final["eval/student_miou"],
    "final_teacher": 100 * final["eval/teacher_miou"],
    "best_student": 100 * max(r["eval/student_miou"] for r in evals),
    "best_teacher": 100 * max(r["eval/teacher_miou"] for r in evals),
    "curve": [(r["step"], 100 * r["eval/teacher_miou"]) for r in evals],
  }


def run_one(config, workdir, overrides, log_path):
  cmd = [sys.executable, "-m", "s4jax.main", f"--config={config}", f"--workdir={workdir}"]
  cmd += [f"--config.{kv}" for kv in overrides]
  t0 = time.monotonic()
  with open(log_path, "a") as log:
    done = subprocess.run(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
  if done.returncode != 0:
    raise SystemExit(f"run failed ({done.returncode}): {' '.join(cmd)}\nsee {log_path}")
  return time.monotonic() - t0


def mean_spread(values):
  values = np.asarray(values, np.float64)
  spread = values.std(ddof=1) if len(values) > 1 else 0.0
  return values.mean(), spread


def main():
  parser = argparse.ArgumentParser(
    description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
  )
  parser.add_argument("--run", action="append", required=True, help="LABEL=CONFIG [k=v ...]")
  parser.add_argument("--set", action="append", default=[], help="key=value for every run")
  parser.add_argument(
    "--no_run", action="store_true", help="tabulate the finished runs only; start nothing"
  )
  parser.add_argument("--seeds", default="0,1,2")
  parser.add_argument("--out", required=True)
  args = parser.parse_args()

  seeds = [int(s) for s in args.seeds.split(",")]
  runs = [parse_run(r) for r in args.run]
  common = list(args.set)
  total_steps = None
  for kv in common:
    if kv.startswith("total_steps="):
      total_steps = int(kv.split("=", 1)[1])
  os.makedirs(os.path.join(args.out, "runs"), exist_ok=True)

  plan = []
  for label, config, own in runs:
    steps = total_steps
    for kv in own:
      if kv.startswith("total_steps="):
        steps = int(kv.split("=", 1)[1])
    if steps is None:
      raise SystemExit("give the step budget: --set total_steps=N")
    plan.append((label, config, common + own, steps))

  # Seed-major: an interrupted ablation has every run of the first seeds.
  rows, curves = [], {}
  for seed in seeds:
    for label, config, overrides, steps in plan:
      workdir = os.path.join(args.out, "runs", f"{label}_seed{seed}")
      timing_path = os.path.join(workdir, "ablate_wall_seconds.json")
      summary = summarise_run(read_metrics(workdir), steps)
      if summary is None and args.no_run:
        print(f"  {label} seed {seed}: not finished (--no_run)", flush=True)
        continue
      if summary is None:
        print(f"running {label} seed {seed} ...", flush=True)
        wall = run_one(config, workdir, overrides + [f"seed={seed}"], workdir + ".log")
        with open(timing_path, "w") as f:
          json.dump({"wall_seconds": wall}, f)
        summary = summarise_run(read_metrics(workdir), steps)
        if summary is None:
          raise SystemExit(f"{workdir} finished without an evaluation at step {steps}")
      with open(timing_path) as f:
        wall = json.load(f)["wall_seconds"]
      rows.append(
        {
          "label": label,
          "seed": seed,
          "wall_seconds": wall,
          **{k: v for k, v in summary.items() if k != "curve"},
        }
      )
      curves.setdefault(label, []).append(summary["curve"])
      print(
        f"  {label} seed {seed}: final teacher {summary['final_teacher']:.2f}  "
        f"best teacher {summary['best_teacher']:.2f}  ({wall:.0f}s)",
        flush=True,
      )

  metrics = ("final_student", "final_teacher", "best_student", "best_teacher")
  lines = [
    f"Settings: {' '.join(common) or '(config defaults)'}; seeds {args.seeds}. "
    "mIoU % as mean ± sample std over seeds.",
    "",
    "| run | " + " | ".join(m.replace("_", " ") for m in metrics) + " | wall time/run |",
    "|---|" + "---|" * (len(metrics) + 1),
  ]
  summary_rows = []
  for label, _, _ in runs:
    mine = [r for r in rows if r["label"] == label]
    if not mine:
      lines.append(f"| {label} | " + " | ".join("-" for _ in metrics) + " | no finished run |")
      continue
    cells, summary_row = [], {"label": label, "seed": "mean"}
    for m in metrics:
      mean, spread = mean_spread([r[m] for r in mine])
      cells.append(f"{mean:.2f} ± {spread:.2f}")
      summary_row[m] = mean
      summary_row[m + "_std"] = spread
    wall_mean = np.mean([r["wall_seconds"] for r in mine])
    summary_row["wall_seconds"] = wall_mean
    summary_rows.append(summary_row)
    lines.append(
      f"| {label} | "
      + " | ".join(cells)
      + f" | {wall_mean / 60:.1f} min"
      + (f" ({len(mine)} seeds)" if len(mine) != len(seeds) else "")
      + " |"
    )
  table = "\n".join(lines)
  print("\n" + table)
  with open(os.path.join(args.out, "results.md"), "w") as f:
    f.write(table + "\n")
  fields = ["label", "seed", "wall_seconds"] + [x for m in metrics for x in (m, m + "_std")]
  with open(os.path.join(args.out, "results.csv"), "w", newline="") as f:
    writer = csv.DictWriter(f, fieldnames=fields, restval="")
    writer.writeheader()
    for r in rows + summary_rows:
      writer.writerow(r)
  plot(curves, os.path.join(args.out, "miou.png"))


def plot(curves, path):
  try:
    import matplotlib  # pylint: disable=g-import-not-at-top

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  except ImportError:
    print("matplotlib is not installed (pip install -e '.[bench]'): no plot written.")
    return
  fig, ax = plt.subplots(figsize=(6, 4))
  for label, per_seed in curves.items():
    steps = [s for s, _ in per_seed[0]]
    values = np.array([[v for _, v in c] for c in per_seed if len(c) == len(steps)])
    mean = values.mean(0)
    ax.plot(steps, mean, marker="o", label=label)
    if len(values) > 1:
      ax.fill_between(steps, values.min(0), values.max(0), alpha=0.2)
  ax.set_xlabel("step")
  ax.set_ylabel("teacher mIoU (%)")
  ax.grid(alpha=0.3)
  ax.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  print(f"plot: {path}")


if __name__ == "__main__":
  main()
