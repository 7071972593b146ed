"""Sample efficiency, fairly: the default controller against fixed accumulation whose learning
rate is tuned per batch size, across settings it was not tuned on. Each setting is a preset of
``gqc-train sweep`` (``spec_of``: a sweep spec built here), run and reported by ``gqc_dist.sweep``.

    python benchmarks/efficiency.py                          # every setting and arm (hours on 2 cores)
    python benchmarks/efficiency.py --settings mb2 --arms cbc fixed1@1
    python benchmarks/efficiency.py --jobs 2                 # two runs side by side
    python benchmarks/efficiency.py --report-only            # tables, verdicts, PNG from results/

Every run is a real ``gqc-train`` (one CPU process) with the same data order per seed, the same
evaluation batches and the learning-rate schedule keyed on tokens, so it spans the whole budget
for every arm. Each setting (``SETTINGS``) lists the arms it runs, of these:

* fixed accumulation of k = 1, 2, 4, 8 micro-batches per step, each at 0.5x, 1x and 2x the
  setting's base learning rate times ``sqrt(k)`` (gqc-train's ``optimizer.lr_coupling`` sqrt;
  weight decay coupled alike), so every k gets the same three-point tuning budget (k = 8, far
  behind everywhere, 1x and 2x only; main-2x, twice as long per run, the rates main favours);
* fractional fixed patterns of 1.25 and 1.5 micro-batches per step (1,1,1,2 and 1,2), at the
  same rates, so the fixed frontier between k = 1 and 2 is measured, not interpolated;
* the same arm in every setting is a fixed k at one learning rate: the target says every one is
  >= 3% behind somewhere (``gqc_dist.sweep.table.verdicts``);
* controllers (``CONTROLLERS``) at fixed k = 1's best learning rate of the setting (the rate a
  user tunes at their micro-batch; the controller couples it to its windows itself), so a
  controller gets k = 1's tuning budget and no more: the default (``cbc-split``, gqc-train's
  default CBC: ``window_gradient`` sqrt, ``rounding`` dither, ``probe`` split), the earlier
  defaults ``cbc-sqrtg-dither`` (probes draw a second micro-batch), ``cbc-sqrtg`` (windows
  rounded up) and ``cbc`` (stepping on each window's mean), and variants; and
  ``cbc-split-base``, ``cbc-sqrtg-dither-base``, ``cbc-sqrtg-base`` and ``cbc-base``, the same
  at gqc-train's one learning rate in every setting (the tuning-free claim; where k = 1's best
  rate is that one, they are the same runs as the controllers'); a setting where the default
  did not run is judged by the previous one (``PREVIOUS``);
* twins (``fixed1@1-twin``, ...): the setting's best fixed arm again with its learning rate
  nudged by a part in a million, a change with no systematic effect: the paired gap between
  twins is the benchmark's noise floor (how far a run's final loss moves when its trajectory is
  perturbed in the last bits, as another CPU or summation order does);
* seeds 1 and 2 (paired: same initialisation and data order per seed) for the arms that decide:
  the best fixed arm of the setting, fixed k = 1's best (the controllers' rate) and the arms a
  setting names (``seeded``: on ``mb2`` both k = 1 rates of a seed-0 tie; they, the 1.5 pattern,
  its twin and the default also ran on seeds 3-7 there, as on ``second`` and ``third``), the
  default controller (and at the base rate), the
  candidates to replace it (``CANDIDATES``) and the twins. The best arm is the lowest mean
  among the arms run on the most seeds (``gqc_dist.sweep.table.best_fixed``): seed 0 picks the arm
  that gets seeds, and a rate that then diverges loses to a steadier one run on as many.
  ``mb2-8seeds`` repeats ``mb2`` with every arm on seeds 0-7; ``third-mb128`` puts the noise
  scale below one micro-batch.

Each run's outcome is kept as one small JSON under ``benchmarks/results/<setting>/<arm>@s<seed>.json``
(final loss on 64 evaluation batches, steps, the histogram of windows taken, the noise scale's
quantiles, how the windows followed ``kappa * B_simple``, the validation curve), so benchmarks/README.md's
tables rebuild from them without rerunning; the full run directories stay in ``benchmarks/out``
(not kept). The records, tables and verdicts come from ``gqc_dist.sweep`` (``records``, ``table``).
"""

import argparse
import json
from pathlib import Path

from gqc_dist.sweep.local import run_local
from gqc_dist.sweep.report import plot_curves
from gqc_dist.sweep.spec import parse
from gqc_dist.sweep.table import best_fixed, best_fixed_per_k, by_arm, table_text, verdicts

HERE = Path(__file__).resolve().parent
OUT = HERE / "out"
RESULTS = HERE / "results"
BASE_LR = 3e-3  # gqc-train's default: the one learning rate of the tuning-free claim


def _torch_sources() -> str:
    """A second corpus present on any machine with torch: its package's ``.py`` files, copied
    (sorted, relative paths kept) into ``benchmarks/out/corpus-torch`` once."""
    import shutil

    import torch

    root, dest = Path(torch.__file__).parent, OUT / "corpus-torch"
    if not dest.exists():
        for path in sorted(root.rglob("*.py")):
            target = dest / path.relative_to(root)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(path, target)
    return str(dest)


SETTINGS = {
    "main": {"set": [], "tokens": 1500 * 16 * 128,
             "about": "gqc-train's default job (Python stdlib corpus, width 128, 16-sequence micro-batches)",
             "arms": ["fixed1@0.5", "fixed1@1", "fixed1@2", "fixed1@4", "fixed1.25@2", "fixed1.5@1", "fixed1.5@2",
                      "fixed2@0.5", "fixed2@1", "fixed2@2", "fixed4@0.5", "fixed4@1", "fixed4@2", "fixed8@1", "cbc",
                      "cbc-sqrtg", "cbc-base", "cbc-sqrtg-base", "cbc-lr4", "cbc-noise", "fixed1@2-twin",
                      "cbc-sqrtg-dither", "cbc-sqrtg-dither-base", "cbc-split", "cbc-split-base", "cbc-split-p4",
                      "cbc-split-p4-base", "cbc-split-seesaw-base",
                      "cbc-split-seesaw-noise-base"]},
    # twice the budget, twice the time per run: the learning rates main's grid favours, and fewer arms
    "main-2x": {"set": [], "tokens": 2 * 1500 * 16 * 128, "about": "the main job at twice its budget",
                "arms": ["fixed1@1", "fixed1@2", "fixed1.5@2", "fixed2@2", "cbc", "cbc-sqrtg",
                         "cbc-sqrtg-dither", "cbc-split"]},
    # k = 1's rate was a tie on seed 0 (0.5x 1.8432, 1x 1.8454): both rates get seeds; its
    # controllers ran at the seed-0 pick, 0.5x, and the base-rate arms are them at 1x, k = 1's
    # best on 8 seeds (the verdicts take those as the ones tuned as k = 1)
    "mb2": {"set": ["data.micro_batch_size=2"], "tokens": 6000 * 2 * 128, "k1_multiplier": 0.5,
            "seeded": ["fixed1@0.5", "fixed1@1"],
            "about": "2-sequence micro-batches, as memory-bound users have",
            "arms": ["fixed1@0.5", "fixed1@1", "fixed1@2", "fixed1.5@1", "fixed2@0.5", "fixed2@1", "fixed2@2",
                     "fixed4@0.5", "fixed4@1", "fixed4@2", "fixed8@1", "fixed1.5@1-sqrtg", "cbc", "cbc-sqrtg",
                     "cbc-base", "cbc-sqrtg-base", "cbc-k0.5", "cbc-k0.5-base", "cbc-seesaw", "fixed1.5@1-twin",
                     "cbc-sqrtg-dither", "cbc-sqrtg-dither-base", "cbc-split", "cbc-split-base", "cbc-split-p4",
                     "cbc-split-p4-base", "fixed1@1-twin", "cbc-split-seesaw-base",
                     "cbc-split-seesaw-noise-base"]},
    # mb2 again on 8 seeds, every arm on every seed, all runs at once on one other machine (the
    # H200 host's 16 CPU cores, torch 2.11, Python 3.12, mb2's corpus carried byte for byte as
    # data.path); its controllers at mb2's seed-0 k = 1 rate (0.5x) or the base rate
    "mb2-8seeds": {"set": ["data.micro_batch_size=2"], "tokens": 6000 * 2 * 128, "seeds": tuple(range(8)),
                   "k1_multiplier": 0.5, "about": "mb2 on 8 seeds, one other machine",
                   "arms": ["fixed1@1", "fixed1.5@1", "fixed1.5@1-twin", "cbc-sqrtg-base", "cbc-sqrtg-dither",
                            "cbc-sqrtg-dither-base"]},
    # mb2 without gradient clipping: there clipping at 1.0 costs k = 1 and helps the 1.5 pattern
    "mb2-noclip": {"set": ["data.micro_batch_size=2", "optimizer.grad_clip=0"], "tokens": 6000 * 2 * 128,
                   "about": "mb2 without gradient clipping",
                   "arms": ["fixed1@0.5", "fixed1@1", "fixed1@2", "fixed1.5@0.5", "fixed1.5@1", "fixed2@0.5",
                            "fixed2@1", "fixed1.5@1-sqrtg", "cbc", "cbc-sqrtg", "fixed1@1-twin",
                            "cbc-sqrtg-dither", "cbc-split", "cbc-split-p4", "cbc-split-seesaw-base",
                            "cbc-split-seesaw-noise-base"]},
    "second": {"set": ["model.dim=192", "model.heads=6", "data.micro_batch_size=8", "data.path=@torch"],
               "tokens": 1000 * 8 * 128, "about": "torch's own sources, width 192, 8-sequence micro-batches",
               "arms": ["fixed1@0.5", "fixed1@1", "fixed1@2", "fixed1.5@1", "fixed2@0.5", "fixed2@1", "fixed2@2",
                        "fixed4@0.5", "fixed4@1", "fixed8@1", "cbc", "cbc-sqrtg", "cbc-base", "fixed1@1-twin",
                        "cbc-sqrtg-dither", "cbc-split", "cbc-split-p4", "cbc-split-seesaw-base",
                        "cbc-split-seesaw-noise-base"]},
    "third": {"set": ["model.seq_len=64", "model.dim=64", "model.heads=2", "model.layers=4",
                      "data.micro_batch_size=32"], "tokens": 600 * 32 * 64,
              "about": "64-token sequences, width 64, 4 layers, 32-sequence micro-batches",
              "arms": ["fixed1@0.5", "fixed1@1", "fixed1@2", "fixed1.5@1", "fixed2@0.5", "fixed2@1", "fixed2@2",
                       "fixed4@0.5", "fixed4@1", "cbc", "cbc-sqrtg", "cbc-base", "fixed1@1-twin",
                       "cbc-sqrtg-dither", "cbc-split", "cbc-split-p4", "cbc-split-seesaw-base",
                       "cbc-split-seesaw-noise-base"]},
    # third with 4x the micro-batch and 2x the tokens: the noise scale below one micro-batch, the
    # regime where the adaptation target asks for windows of one at fixed k = 1's loss
    "third-mb128": {"set": ["model.seq_len=64", "model.dim=64", "model.heads=2", "model.layers=4",
                            "data.micro_batch_size=128"], "tokens": 300 * 128 * 64,
                    "about": "third with 128-sequence micro-batches, twice the tokens",
                    "arms": ["fixed1@0.5", "fixed1@1", "fixed1@2", "fixed2@1", "fixed1@1-twin", "cbc-sqrtg-dither",
                             "cbc-split", "cbc-split-p4", "cbc-split-seesaw-base",
                             "cbc-split-seesaw-noise-base"]},
}

DEFAULT = "cbc-split"  # gqc-train's default controller
TUNING_FREE = "cbc-split-base"
PREVIOUS = (("cbc-sqrtg-dither", "cbc-sqrtg-dither-base"),)  # judged where the default did not run (mb2-8seeds)
_CBC = {"algorithm": "cbc", "kappa": 0.25, "max_draws": 16}  # gqc-train's default before window_gradient sqrt
_DITHER = {**_CBC, "window_gradient": "sqrt", "rounding": "dither"}
_SPLIT = {**_DITHER, "probe": "split"}  # gqc-train's default
CONTROLLERS = {  # {name: (gqc section, more overrides)}
    "cbc": (_CBC, []),  # the earlier default: each window's mean gradient
    "cbc-k0.5": ({**_CBC, "kappa": 0.5}, []),
    "cbc-seesaw": (_CBC, ["optimizer.seesaw=true"]),
    # gqc-train's default: the optimizer steps on the window's sum / sqrt(n), so Adam's second
    # moment fits every window length
    "cbc-sqrtg": ({**_CBC, "window_gradient": "sqrt"}, []),
    # the learning rate grows with the window only as far as the noise scale says it pays
    "cbc-noise": (_CBC, ["optimizer.lr_coupling=noise"]),
    # the default with windows of kappa * B_simple in the mean instead of its ceiling
    "cbc-sqrtg-dither": (_DITHER, []),
    # the same with its probes taken by splitting one micro-batch in two instead of drawing a second
    "cbc-split": (_SPLIT, []),
    # split probes six times as often (every 4th window of one instead of every 24th): a split
    # costs no data, and six probes of about 2.3x an extra micro-batch's standard error average
    # to about the precision of one extra-micro-batch probe per 24 windows (measured: not adopted;
    # with one-sequence halves it measured a larger noise scale and took longer windows)
    "cbc-split-p4": ({**_SPLIT, "probe_interval": 4}, []),
    # the default with Seesaw's batch growth: where the cosine would cut the rate by a, the window
    # floor grows by a and the rate falls by sqrt(a) (the route to fewer steps)
    "cbc-split-seesaw": (_SPLIT, ["optimizer.seesaw=true"]),
    # the same growth only up to the measured noise scale: a batch beyond it removes no noise
    "cbc-split-seesaw-noise": (_SPLIT, ["optimizer.seesaw=noise"]),
}
# controllers at a fixed multiple of the base rate instead of k = 1's best: {arm: (controller, multiplier)}
AT_FIXED_RATE = {
    TUNING_FREE: (DEFAULT, 1),  # the default at gqc-train's one learning rate in every setting
    "cbc-base": ("cbc", 1),  # the earlier default, likewise
    "cbc-k0.5-base": ("cbc-k0.5", 1),
    # main: the earlier default at 4x, where k = 1 won on seed 0 and diverged on seed 1 (k = 1's
    # best by its mean is 2x)
    "cbc-lr4": ("cbc", 4),
    "cbc-sqrtg-dither-base": ("cbc-sqrtg-dither", 1),
    "cbc-split-base": ("cbc-split", 1),
    "cbc-split-p4-base": ("cbc-split-p4", 1),
    "cbc-split-seesaw-base": ("cbc-split-seesaw", 1),
    "cbc-split-seesaw-noise-base": ("cbc-split-seesaw-noise", 1),
}
# variants run on every seed, like the default, because they may replace it
CANDIDATES = ("cbc-sqrtg-dither", "cbc-sqrtg-dither-base", "cbc-split", "cbc-split-base", "cbc-split-p4",
              "cbc-split-p4-base", "cbc-split-seesaw-base", "cbc-split-seesaw-noise-base")
KS = (1, 2, 4, 8)
TWINNED = ("fixed1@1", "fixed1@2", "fixed1.5@1")  # the settings' best fixed arms
MULTIPLIERS = (0.5, 1, 2)
SEEDS = (0, 1, 2)


def arm_entries():
    """Every arm as a sweep spec's arm entry (``gqc_dist.sweep.spec``): ``{name: entry}``; twins
    are the spec's ``twins``."""
    out = {}
    for k in KS:
        # k = 8 trails everywhere: two rates; k = 1's best lay at the grid's edge on main: one more
        for m in {1: MULTIPLIERS + (4,), 8: MULTIPLIERS[1:]}.get(k, MULTIPLIERS):
            out[f"fixed{k}@{m:g}"] = {"fixed": k, "lr": [m]}
    for k in (1.25, 1.5):  # between k = 1 and 2, at the rates that won for them
        for m in MULTIPLIERS:
            out[f"fixed{k:g}@{m:g}"] = {"fixed": k, "lr": [m]}
    # the 1,2 pattern stepping on each window's sum / sqrt(n) (CONTROLLERS' cbc-sqrtg): varying windows alone
    out["fixed1.5@1-sqrtg"] = {"name": "fixed1.5@1-sqrtg", "fixed": 1.5, "lr": [1], "set": ["gqc.window_gradient=sqrt"]}
    for name, (gqc, extra) in CONTROLLERS.items():  # at fixed k = 1's best rate ("k1")
        out[name] = {"name": name, "gqc": gqc, "lr": "k1", "set": extra}
    for name, (controller, multiplier) in AT_FIXED_RATE.items():
        out[name] = {**out[controller], "name": name, "lr": multiplier}
    return out


ARMS = arm_entries()
ARM_NAMES = list(ARMS) + [f"{name}-twin" for name in TWINNED]


def spec_of(setting: str, names=None, corpus=None):
    """``setting`` as a sweep spec: its base overrides, its arms (of ``names``), its seeds, twins
    and the default controller to judge; ``@torch`` in a data path becomes ``corpus()``'s folder."""
    own = SETTINGS[setting]
    names = set(ARM_NAMES if names is None else names)
    arms = [a for a in own["arms"] if a in names and a in ARMS]
    twins = [a[:-len("-twin")] for a in own["arms"] if a in names and a.endswith("-twin")]
    arms += [t for t in twins if t not in arms]  # a twin's arm is in the spec (not run unless asked)
    base = [f"train.tokens={own['tokens']}", "train.optimizer_steps=10000000", "train.max_micro_steps=10000000",
            "train.checkpoint_interval=10000000", "train.eval_interval=50"]
    base += [s.replace("@torch", corpus()) if "@torch" in s and corpus else s for s in own["set"]]
    raw = {"name": setting, "about": own["about"], "results": str(RESULTS / setting), "runs": str(OUT / setting),
           "base": {"set": base}, "base_lr": BASE_LR, "arms": [ARMS[a] for a in arms],
           "seeds": list(own.get("seeds", SEEDS)), "twins": twins, "judge": DEFAULT if DEFAULT in arms else None}
    if "k1_multiplier" in own:
        raw["k1_lr"] = own["k1_multiplier"]
    return parse(raw, HERE)


def plan(settings, names, seeds):
    """The runs to make per setting, in two waves: seed 0 of every arm (fixed k = 1 first: the
    controllers' learning rate comes from it, and the sweep waits for it); then the other seeds
    (a setting's own ``seeds`` where it names them) of the arms that decide: the best fixed arm
    and fixed k = 1's best (known once seed 0 of the grid is in; a setting may name more,
    ``seeded``), the default (also at the base rate), the candidates and the twins, or every arm
    where the setting names its seeds."""
    names = list(dict.fromkeys(names))
    seeded = {DEFAULT, TUNING_FREE, *CANDIDATES} | {a for a in names if a.endswith("-twin")}

    def first(setting):
        chosen = [a for a in SETTINGS[setting]["arms"] if a in names]
        chosen.sort(key=lambda a: (ARMS.get(a, {}).get("fixed") != 1, a != DEFAULT, a not in ARMS or "gqc" in ARMS[a]))
        return [(a, 0) for a in chosen]

    def later(setting):
        if "seeds" in SETTINGS[setting]:
            deciding = set(names)
        else:
            arms_ = by_arm(load_results(setting))
            deciding = seeded | {best_fixed(arms_), best_fixed_per_k(arms_).get(1), *SETTINGS[setting].get("seeded", ())}
        chosen = sorted(deciding & {a for a in SETTINGS[setting]["arms"] if a in names})
        return [(a, seed) for seed in SETTINGS[setting].get("seeds", seeds) if seed for a in chosen]
    return first, later


def load_results(setting: str):
    folder = RESULTS / setting
    return [json.loads(p.read_text()) for p in sorted(folder.glob("*@s*.json"))
            if not p.name.endswith(".failed.json")] if folder.exists() else []


def plot(settings, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(settings), 2, figsize=(13, 4.2 * len(settings)), squeeze=False)
    for row, setting in enumerate(settings):
        plot_curves(axes[row], setting, load_results(setting), DEFAULT)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    return path


def report(settings, png: Path) -> None:
    for setting in settings:
        records = load_results(setting)
        if records:
            spec = SETTINGS[setting]
            print("\n" + table_text(setting, spec["about"], spec["tokens"], records))
    print("\nTargets:")
    for line in verdicts({s: load_results(s) for s in settings}, DEFAULT, TUNING_FREE, PREVIOUS):
        print("  " + line)
    print(f"\nwrote {plot(settings, png)}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    parser.add_argument("--arms", nargs="+", default=ARM_NAMES, choices=ARM_NAMES)
    parser.add_argument("--seeds", nargs="+", type=int, default=list(SEEDS))
    parser.add_argument("--jobs", type=int, default=1, help="runs side by side (one core each)")
    parser.add_argument("--report-only", action="store_true")
    parser.add_argument("--plot", type=Path, default=HERE / "efficiency.png", help="where the PNG goes")
    args = parser.parse_args()
    if not args.report_only:
        first, later = plan(args.settings, args.arms, args.seeds)
        for setting in args.settings:
            spec = spec_of(setting, args.arms, _torch_sources)
            for keys in (first(setting), later(setting)):
                run_local(spec, keys, args.jobs)
    report(args.settings, args.plot)


if __name__ == "__main__":
    main()
