"""Choosing points instead of sweeping them, measured on the tiny foundations (after `make demo`).

For each recipe's demo runs (copied, so the demo's own report stays as it was), the recipe is run
again with an 11-point grid, `auto` and HMA at several means: the fine-tuned models are reused,
only the new points are merged and scored. Then, per method:

- HMA against uniform averaging at the same mean alpha: speciality and generality side by side;
- the auto-alpha pick against the 5-point and the 11-point grid: evaluations used (merges scored
  besides the two ends), the point chosen, and its generality against the most general grid point
  that meets the same speciality floor.

    python benchmarks/bench_selection.py --output benchmarks/results/selection.json

writes `selection.json` and `selection.md` beside it.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path


ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from hf_specgen.eval.records import ResultRecord  # noqa: E402


GRID_5 = [0.25, 0.5, 0.75]  # besides the ends
GRID_11 = [round(0.1 * i, 1) for i in range(1, 10)]
METHODS = ["full", "l1", "l2", "ewc", "kd", "feature", "lora"]  # one strength each, all of them chosen for
RECIPES = {"galactica_med": "galactica_med_tiny.yaml", "clip_imagenet": "clip_tiny.yaml"}
# Per recipe: the strength of the tiny preset's sweep that this measurement uses (one run per method, whose
# fine-tune the demo made) and the HMA search (3 groups for the LM, 2 for CLIP, whose text tower has 2 blocks).
SETTINGS = {
    "galactica_med": ["--l2_lambda", "0.01", "--lora_r", "16", "--hma_groups", "3"],
    "clip_imagenet": ["--l2_lambda", "0.1", "--lora_r", "8", "--hma_groups", "2"],
}
HMA = ["--hma_samples", "generated", "--hma_max_samples", "64", "--hma_steps", "20"]


def run_recipe(name: str, config: str, output_dir: Path, means: list[float]) -> float:
    alphas = ["0", *map(str, GRID_11), "0.25", "0.75", "1", "auto"]
    command = [
        sys.executable,
        str(ROOT / "recipes" / f"{name}.py"),
        "--config",
        str(ROOT / "recipes" / "configs" / config),
        "--output_dir",
        str(output_dir),
        "--alphas",
        *alphas,
        "--hma_mean_alphas",
        *map(str, means),
        "--methods",
        *METHODS,
        "--selection_methods",
        *METHODS,
        *SETTINGS[name],
        *HMA,
        "--disable_tqdm",
        "true",
    ]
    start = time.perf_counter()
    subprocess.run(command, check=True, cwd=ROOT, env={**os.environ, "HF_HUB_OFFLINE": "1"}, stdout=subprocess.DEVNULL)
    return time.perf_counter() - start


def best_meeting(points: dict[float, ResultRecord], floor: float) -> tuple[float, ResultRecord]:
    """The most general point (smaller alpha on ties) whose speciality reaches `floor`."""
    meeting = {a: r for a, r in points.items() if r.speciality_score >= floor}
    alpha = max(meeting, key=lambda a: (meeting[a].generality_score, -a))
    return alpha, meeting[alpha]


def measure(name: str, output_dir: Path) -> dict:
    (reference,) = [ResultRecord.load(p) for p in output_dir.glob("runs/*/records-*/record.json")]
    rows = {"hma": [], "auto": []}
    for run in sorted(p for p in (output_dir / "runs").iterdir() if p.name not in ("pre-trained", "zero-shot")):
        method = run.name.rsplit("-", 1)[0]
        if method not in METHODS or not any(
            run.glob("records-*/auto-*.json")
        ):  # a strength or method of the sweep only
            continue
        (records,) = run.glob("records-*")
        grid = {0.0: reference}
        grid.update({r.alpha: r for r in map(ResultRecord.load, records.glob("alpha-*.json"))})
        for path in sorted(records.glob("hma-*.json")):
            hma = ResultRecord.load(path)
            uniform = grid[hma.alpha]
            rows["hma"].append(
                {
                    "recipe": name,
                    "method": method,
                    "mean_alpha": hma.alpha,
                    "group_alphas": hma.merge["group_alphas"],
                    "hma": [hma.speciality_score, hma.generality_score],
                    "uniform": [uniform.speciality_score, uniform.generality_score],
                    "held_out_loss": hma.selection["held_out_loss"],
                    "uniform_loss": hma.selection["uniform_loss"],
                }
            )
        (pick,) = map(ResultRecord.load, records.glob("auto-*.json"))
        floor = pick.selection["floor"]
        row = {
            "recipe": name,
            "method": method,
            "floor": floor,
            "auto_alpha": pick.alpha,
            "auto_evaluations": pick.selection["evaluations"],
            "auto": [pick.speciality_score, pick.generality_score],
            "monotone": pick.selection["monotone"],
        }
        for label, alphas in (("grid5", GRID_5), ("grid11", GRID_11)):
            alpha, best = best_meeting({a: grid[a] for a in [0.0, *alphas, 1.0]}, floor)
            row[label] = {
                "alpha": alpha,
                "evaluations": len(alphas),
                "scores": [best.speciality_score, best.generality_score],
                "generality_lost_by_auto": best.generality_score - pick.generality_score,
            }
        rows["auto"].append(row)
    return rows


def markdown(results: dict) -> str:
    lines = [
        "# Choosing points on the tiny foundations",
        "",
        f"From `make demo`'s fine-tunes; re-run for an 11-point grid, `auto` and HMA means {results['means']} in "
        f"{results['seconds']} s ({results['date']}).",
        "",
        "## HMA against uniform averaging at the same mean alpha",
        "",
        "| recipe | method | mean | HMA ratios | HMA spec / gen | uniform spec / gen | d spec | d gen "
        "| held-out loss HMA / uniform |",
        "|---|---|---:|---|---:|---:|---:|---:|---:|",
    ]
    hma = [row for rows in results["recipes"].values() for row in rows["hma"]]
    for r in hma:
        ratios = "/".join(f"{a:.2f}" for a in r["group_alphas"])
        ds, dg = r["hma"][0] - r["uniform"][0], r["hma"][1] - r["uniform"][1]
        lines.append(
            f"| {r['recipe']} | {r['method']} | {r['mean_alpha']:g} | {ratios} | "
            f"{r['hma'][0]:.3f} / {r['hma'][1]:.3f} | "
            f"{r['uniform'][0]:.3f} / {r['uniform'][1]:.3f} | {ds:+.3f} | {dg:+.3f} | "
            f"{r['held_out_loss']:.4f} / {r['uniform_loss']:.4f} |"
        )
    for recipe in results["recipes"]:
        mine = [r for r in hma if r["recipe"] == recipe]
        if mine:
            ds = statistics.fmean(r["hma"][0] - r["uniform"][0] for r in mine)
            dg = statistics.fmean(r["hma"][1] - r["uniform"][1] for r in mine)
            wins = sum(r["hma"][0] >= r["uniform"][0] and r["hma"][1] >= r["uniform"][1] for r in mine)
            lines.append(
                f"\n{recipe}: over {len(mine)} HMA points, mean change {ds:+.4f} speciality, {dg:+.4f} generality; "
                f"{wins} of {len(mine)} at least as good on both."
            )
    lines += [
        "",
        "## The auto-alpha pick against the 5- and 11-point grids",
        "",
        "Evaluations: merges scored besides alpha 0 and 1. `lost`: the generality of the best grid point that "
        "meets the same floor minus the auto pick's (positive: the grid found a more general point).",
        "",
        "| recipe | method | floor | auto alpha (evals) | auto spec / gen | 5-grid alpha | lost | 11-grid alpha "
        "| lost |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    autos = [row for rows in results["recipes"].values() for row in rows["auto"]]
    for r in autos:
        flag = "" if r["monotone"] else " (not monotone)"
        lines.append(
            f"| {r['recipe']} | {r['method']} | {r['floor']:.3f} | "
            f"{r['auto_alpha']:g} ({r['auto_evaluations']}){flag} | {r['auto'][0]:.3f} / {r['auto'][1]:.3f} | "
            f"{r['grid5']['alpha']:g} | {r['grid5']['generality_lost_by_auto']:+.3f} | "
            f"{r['grid11']['alpha']:g} | {r['grid11']['generality_lost_by_auto']:+.3f} |"
        )
    if autos:
        evaluations = statistics.fmean(r["auto_evaluations"] for r in autos)
        lost5 = statistics.fmean(r["grid5"]["generality_lost_by_auto"] for r in autos)
        lost11 = statistics.fmean(r["grid11"]["generality_lost_by_auto"] for r in autos)
        lines.append(
            f"\nMean evaluations: auto {evaluations:.2f}, 5-point grid 3, "
            f"11-point grid 9. Mean generality lost by auto: {lost5:+.4f} "
            f"against the 5-point grid, {lost11:+.4f} "
            "against the 11-point grid."
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--demo", type=Path, default=ROOT / "results" / "demo", help="make demo's output (default: results/demo)"
    )
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/hf_specgen_selection"), help="where the copies run")
    parser.add_argument("--means", type=float, nargs="+", default=[0.25, 0.5, 0.75], help="HMA mean alphas")
    parser.add_argument("--output", type=Path, default=ROOT / "benchmarks" / "results" / "selection.json")
    args = parser.parse_args()
    results = {"means": args.means, "date": time.strftime("%Y-%m-%d"), "recipes": {}}
    start = time.perf_counter()
    for name, config in RECIPES.items():
        source, target = args.demo / name, args.workdir / name
        if not (source / "runs").is_dir():
            sys.exit(f"{source}: no runs; run `make demo` first")
        if not target.is_dir():
            shutil.copytree(source, target)
        run_recipe(name, config, target, args.means)
        results["recipes"][name] = measure(name, target)
    results["seconds"] = round(time.perf_counter() - start)
    args.output.write_text(json.dumps(results, indent=2) + "\n")
    args.output.with_suffix(".md").write_text(markdown(results))
    print(markdown(results))


if __name__ == "__main__":
    main()
