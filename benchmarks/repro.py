"""The reproduction table: each seed paper's headline claim, rerun on hetfl's presets with several
seeds and tuned learning rates, judged by paired tests. Writes benchmarks/REPRO.md.

Every claim is one `hetfl compare` (hetfl.sweep.compare) into OUT/<claim>/: each method's
learning rate is first tuned on a validation split of the clients' training data (never the
evaluation set; grid = the preset's rate times --lr-factors), then every method runs on the same
seeds. Verdicts come from paired differences across seeds (95% t-interval):

- above:        every baseline: the interval of (method - baseline) is above 0, at no more upload
                (<= 1.05x); `does not hold` if one is below 0 or the upload is higher.
- at-or-above:  every baseline: the interval's lower end is above -margin (non-inferiority), plus
                the claim's side condition; `does not hold` if one interval is entirely below 0.
- close:        the interval lies inside (-margin, +margin); `does not hold` if it lies outside.
- far-above:    the interval's lower end is above +margin; `does not hold` if its upper end is below.
- gain:         the claimed method's final score minus its own round-0 score (the untuned base model)
                on the same seed: `holds` if the interval is above +margin, `does not hold` if it is
                below it (no baselines).
- cheaper:      latency and energy per round both lower (intervals below 0) and accuracy within
                (-margin, +margin); `does not hold` if either cost is higher or accuracy is worse.
Anything else is `undecided`, with an estimate of the seeds that would decide at the observed spread.

    python benchmarks/repro.py --claims floral sflam --seeds 3 --jobs 2     # some claims
    python benchmarks/repro.py --quick                                      # every claim, short runs
Last line: `repro_holds=<k>/<n>`.
"""

from __future__ import annotations

import argparse
import csv
import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

from hetfl.config import load_config  # noqa: E402
from hetfl.sweep import Entry, compare  # noqa: E402
from hetfl.track.stats import mean_ci, t_quantile  # noqa: E402


@dataclass
class Claim:
    key: str
    paper: str  # the paper's claim and number
    preset: str
    method: tuple[str, list[str]]  # (label, overrides) of the claimed method
    baselines: list[tuple[str, list[str]]]
    rule: str  # above | at-or-above | close | far-above | gain | cheaper
    metric: str  # quality metric column of runs.csv
    margin: float = 1.0  # points (non-inferiority, equivalence, "far")
    side: str = ""  # side condition: "memory" (client memory below every baseline's) or "data<1.5%"
    quick: list[str] = field(default_factory=list)  # overrides of --quick


CLAIMS = [
    Claim("fslora", "FSLoRA above HeteroLoRA, FlexLoRA and FLoRA-stack at equal or lower upload "
          "(GLUE avg 83.3 vs best baseline 79.6, +3.7)", "fslora-digits",
          ("fslora", ["method.name=fslora"]),
          [(m, [f"method.name={m}"]) for m in ("heterolora", "flexlora", "flora-stack")],
          "above", "eval_accuracy"),
    Claim("fedv", "FedV at or above FedAvg and Ditto with a fraction of the client memory "
          "(qualitative; 96.87% on CIFAR-10 Dir(0.3))", "split-vision",
          ("fedv", ["method.name=fedv"]), [(m, [f"method.name={m}"]) for m in ("fedavg-full", "ditto")],
          "at-or-above", "eval_accuracy", side="memory", quick=["rounds=3"]),
    Claim("fedvz", "FedVZ close to FedV (\"stays competitive\"; no number)", "split-vision",
          ("fedvz", ["method.name=fedvz"]), [("fedv", ["method.name=fedv"])], "close", "eval_accuracy",
          margin=2.0, quick=["rounds=3"]),
    Claim("floral", "FLoRAL far above FedAvg under label shift (MNIST-LS 89.7 vs 25.8)", "floral-digits-labelshift",
          ("floral", ["method.name=floral"]), [("fedavg-full", ["method.name=fedavg-full"])], "far-above",
          "eval_client_accuracy_mean", margin=10.0, quick=["rounds=10"]),
    Claim("fedhds", "FedHDS at or above full-data FedIT with under 1.5% of the data (Rouge-L +6.8% avg over FedIT)",
          "fedhds-dolly05", ("fedhds", ["selection.name=fedhds"]), [("fedit-full", ["selection.name=none"])],
          "at-or-above", "eval_rougeL", side="data<1.5%", quick=["rounds=4"]),
    Claim("tuning", "Federated instruction tuning teaches new tasks above the base model (the papers' starting "
          "point: an instruction-following base; FedIT/FedHDS report Rouge-L gains over it)", "fedit-instruct",
          ("fedit", ["method.name=fedit", "rounds=24"]), [], "gain", "eval_rougeL", margin=0.0),
    Claim("tuning-smollm2", "The same on the real-model tier, SmolLM2-135M-Instruct (one round)",
          "fedit-instruct-smollm2", ("fedit", ["method.name=fedit", "rounds=1"]), [], "gain", "eval_rougeL",
          margin=0.0),
    Claim("sflam", "SFLAM below fixed allocations in latency and energy at equal accuracy (qualitative)",
          "sflam-vision", ("sflam", ["method.name=sflam"]),
          [("sflam-fixed", ["method.name=sflam", "wireless.mode=fixed"])], "cheaper", "eval_accuracy",
          quick=["rounds=3"]),
]


def read_runs(path: Path) -> dict[str, dict[int, dict[str, str]]]:
    out: dict[str, dict[int, dict[str, str]]] = {}
    with open(path) as f:
        for r in csv.DictReader(f):
            out.setdefault(r["run"], {})[int(r["seed"])] = r
    return out


def diffs(runs, a: str, b: str, col: str) -> list[float]:
    return [float(runs[a][s][col]) - float(runs[b][s][col]) for s in sorted(runs[a]) if s in runs[b]]


def seeds_to_decide(d: list[float], threshold: float) -> str:
    """Seeds a paired t-interval needs to clear `threshold` at the observed mean and spread."""
    m, _ = mean_ci(d)
    sd = math.sqrt(sum((x - m) ** 2 for x in d) / (len(d) - 1)) if len(d) > 1 else float("nan")
    gap = abs(m - threshold)
    if not math.isfinite(sd) or gap < 1e-9:
        return "the observed difference sits on the threshold: more seeds would not decide; a stronger scenario would"
    n = len(d)
    while n < 1000 and t_quantile(n - 1) * sd / math.sqrt(n) >= gap:
        n += 1
    return f"about {n} seeds would decide at this spread" if n < 1000 else "over 1000 seeds would be needed"


def judge(c: Claim, runs) -> tuple[str, str]:
    """(verdict, note) for claim `c` from the per-seed runs."""
    me = c.method[0]
    notes, verdicts = [], []
    if c.rule == "gain":
        d = [float(runs[me][s][c.metric]) - float(runs[me][s]["base_" + c.metric]) for s in sorted(runs[me])]
        m, h = mean_ci(d)
        notes.append(f"gain over the base model {m:+.2f} ± {h:.2f}")
        if m - h > c.margin:
            return "holds", "; ".join(notes)
        if m + h < c.margin:
            return "does not hold", "; ".join(notes)
        return "undecided", "; ".join([*notes, seeds_to_decide(d, c.margin)])
    for b, _ in c.baselines:
        d = diffs(runs, me, b, c.metric)
        m, h = mean_ci(d)
        lo, hi = m - h, m + h
        if c.rule in ("above", "at-or-above", "far-above"):
            thr = {"above": 0.0, "at-or-above": -c.margin, "far-above": c.margin}[c.rule]
            v = "holds" if lo > thr else "does not hold" if (hi < (0.0 if c.rule == "at-or-above" else thr)) else "undecided"
            if c.rule == "above":
                up = sum(float(runs[me][s]["mb_up"]) for s in runs[me]) / max(1, sum(float(runs[b][s]["mb_up"])
                                                                                      for s in runs[b]))
                if up > 1.05:
                    v = "does not hold"
                    notes.append(f"upload {up:.2f}x {b}'s")
            if v == "undecided":
                notes.append(f"vs {b}: {seeds_to_decide(d, thr)}")
        elif c.rule == "close":
            v = "holds" if -c.margin < lo and hi < c.margin else "does not hold" if (lo > c.margin or hi < -c.margin) \
                else "undecided"
            if v == "undecided":
                notes.append(f"vs {b}: {seeds_to_decide(d, c.margin if m > 0 else -c.margin)}")
        else:  # cheaper
            dl = diffs(runs, me, b, "latency_s_per_round")
            de = diffs(runs, me, b, "energy_j_per_round")
            (ml, hl), (me_, he) = mean_ci(dl), mean_ci(de)
            cheaper = ml + hl < 0 and me_ + he < 0
            costlier = ml - hl > 0 or me_ - he > 0
            acc_eq = -c.margin < lo and hi < c.margin
            v = "holds" if cheaper and acc_eq else "does not hold" if (costlier or hi < -c.margin) else "undecided"
            notes.append(f"latency {ml:+.3g}±{hl:.2g} s/round, energy {me_:+.3g}±{he:.2g} J/round vs {b}")
            if v == "undecided" and not acc_eq:
                notes.append(f"accuracy vs {b}: {seeds_to_decide(d, c.margin if m > 0 else -c.margin)}")
        verdicts.append(v)
    if c.side == "memory":
        mine = max(float(runs[me][s]["client_mem_peak_mb"]) for s in runs[me])
        for b, _ in c.baselines:
            theirs = max(float(runs[b][s]["client_mem_peak_mb"]) for s in runs[b])
            notes.append(f"client memory {mine / theirs:.2f}x {b}'s")
            if mine >= theirs:
                verdicts.append("does not hold")
    if c.side == "data<1.5%":
        frac = [float(runs[me][s].get("data_fraction_mean") or "nan") for s in runs[me]]
        if all(math.isfinite(f) for f in frac):
            notes.append(f"data used {100 * sum(frac) / len(frac):.2f}%")
            if sum(frac) / len(frac) >= 0.015:
                verdicts.append("does not hold")
    final = "does not hold" if "does not hold" in verdicts else "holds" if all(v == "holds" for v in verdicts) \
        else "undecided"
    return final, "; ".join(notes)


def fmt_ours(c: Claim, runs) -> str:
    parts = []
    for label, _ in [c.method, *c.baselines]:
        vals = [float(runs[label][s][c.metric]) for s in sorted(runs[label])]
        m, h = mean_ci(vals)
        parts.append(f"{label} {m:.1f} ± {h:.1f}")
    if c.rule == "gain":
        m, h = mean_ci([float(r["base_" + c.metric]) for _, r in sorted(runs[c.method[0]].items())])
        parts.append(f"base model {m:.1f} ± {h:.1f}")
    return ", ".join(parts) + f" ({c.metric.removeprefix('eval_')}, n={len(vals)})"


def write_md(md: Path, rows, claims_run: list[str], quick: bool) -> None:
    """REPRO.md: this run's rows, and the rows of claims not rerun as they were."""
    cmd = "python benchmarks/repro.py " + " ".join(sys.argv[1:])
    kept = {}  # rows of claims not rerun this time stay as they were measured
    if md.is_file():
        for line in md.read_text().splitlines():
            key = line.split("|")[1].strip() if line.startswith("| ") else ""
            if key in {c.key for c in CLAIMS} and key not in claims_run:
                kept[key] = line
    lines = ["# Reproduction table", "",
             "Each row: `benchmarks/repro.py` (verdict rules, margins and the tuning protocol are in its docstring); "
             "values are mean ± half-width of the 95% t-interval over seeds, learning rates tuned on a validation "
             "split unless the row says otherwise. `undecided` means the scenario is too weak to tell at this number "
             "of seeds; the row says what would decide.", "",
             "| claim | paper | preset | ours | verdict | notes |", "|---|---|---|---|---|---|"]
    def preset(c: Claim) -> str:
        shared = [o for o in c.method[1] if not o.startswith(("method.", "selection."))]  # e.g. rounds=24
        extra = [*shared, *(c.quick if quick else [])]
        return f"`{c.preset}`" + (f" ({', '.join(extra)})" if extra else "")

    new_rows = {c.key: f"| {c.key} | {c.paper} | {preset(c)} | {ours} | "
                       f"**{verdict}** | {note}; `{cmd}`, {time.strftime('%Y-%m-%d')}, {wall:.0f} s |"
                for c, ours, verdict, note, wall in rows}
    for c in CLAIMS:
        if c.key in new_rows or c.key in kept:
            lines.append(new_rows.get(c.key) or kept[c.key])
    md.write_text("\n".join(lines) + "\n")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--claims", nargs="+", default=[c.key for c in CLAIMS], choices=[c.key for c in CLAIMS])
    ap.add_argument("--seeds", default="3", help="count or list, as `hetfl compare --seeds`")
    ap.add_argument("--lr-factors", default="0.3,1,3", help="tuning grid: the preset's train.lr times these")
    ap.add_argument("--no-tune", action="store_true", help="run at the presets' rates (the table says so)")
    ap.add_argument("--quick", action="store_true", help="shorter runs (each claim's `quick` overrides)")
    ap.add_argument("--set", dest="overrides", action="append", default=[], help="override for every run")
    ap.add_argument("--jobs", type=int, default=1)
    ap.add_argument("--out", default="runs/repro")
    ap.add_argument("--md", default=str(Path(__file__).with_name("REPRO.md")))
    ap.add_argument("--resume", action="store_true")
    args = ap.parse_args()

    rows = []
    for c in [next(x for x in CLAIMS if x.key == k) for k in dict.fromkeys(args.claims)]:
        t0 = time.time()
        extra = [*(c.quick if args.quick else []), *args.overrides]
        base_lr = load_config(c.preset, extra).train.lr
        grid = None if args.no_tune else [("train.lr", [round(base_lr * float(f), 8) for f in args.lr_factors.split(",")])]
        entries = [Entry(label, c.preset, [*ov, *extra]) for label, ov in [c.method, *c.baselines]]
        out = Path(args.out) / c.key
        compare(entries, out, seeds_arg=args.seeds, force=not args.resume, resume=args.resume, tune_grid=grid,
                tune_metric=c.metric if c.metric.startswith("eval_client_") else None, jobs=args.jobs)
        runs = read_runs(out / "runs.csv")
        from hetfl.track.rundir import read_metrics

        if c.rule == "gain":  # each run's round-0 evaluation is its untuned base model
            for label in runs:
                for s, r in runs[label].items():
                    h = read_metrics(out / label / f"seed-{s}" / "metrics.jsonl")
                    r["base_" + c.metric] = str(next(m[c.metric] for m in h if m["round"] == 0))
        if c.side == "data<1.5%":  # mean per-round data fraction of every run, from its metrics
            for label in runs:
                for s, r in runs[label].items():
                    h = [m["data_fraction"] for m in read_metrics(out / label / f"seed-{s}" / "metrics.jsonl")
                         if "data_fraction" in m]
                    r["data_fraction_mean"] = str(sum(h) / len(h)) if h else ""
        verdict, note = judge(c, runs)
        tuned = "" if grid else f"untuned: the preset's train.lr {base_lr:g}"
        if grid and (out / "tuned.yaml").is_file():
            import yaml

            t = yaml.safe_load((out / "tuned.yaml").read_text())
            edge = (min(grid[0][1]), max(grid[0][1]))
            tuned = "tuned lr: " + ", ".join(f"{k} {v['train.lr']:g}{'*' if v['train.lr'] in edge else ''}"
                                             for k, v in t.items())
            if "*" in tuned:
                tuned += " (* at the grid's edge)"
        rows.append((c, fmt_ours(c, runs), verdict, "; ".join(x for x in (note, tuned) if x), time.time() - t0))
        print(f"{c.key}: {verdict} ({rows[-1][1]}) {rows[-1][3]} [{rows[-1][4]:.0f} s]", flush=True)
        write_md(Path(args.md), rows, [r[0].key for r in rows], args.quick)  # each claim lands as it finishes

    print(f"wrote {args.md}")
    print(f"repro_holds={sum(v == 'holds' for _, _, v, _, _ in rows)}/{len(rows)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
