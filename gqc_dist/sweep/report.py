"""A sweep's report: a markdown table with paired gaps and seed ranges, the noise floor, each
controller's windows and noise scale, its steps against the fixed frontier and against
``adaptive_steps_bound``, the verdict lines, what failed or is missing, and a PNG.

Built only from the kept records (:func:`gqc_dist.sweep.runs.load_records`), so
``gqc-train sweep SPEC --report-only`` rebuilds it without a run, merging whatever has finished,
locally or in Slurm tasks.
"""

from pathlib import Path
from typing import List, Sequence

from gqc_dist.sweep.runs import Key, run_name
from gqc_dist.sweep.spec import Spec
from gqc_dist.sweep.table import best_fixed, by_arm, fmt, setting_rows, spread_text, verdicts


def _records_of(spec: Spec, records: Sequence[dict]) -> List[dict]:
    return [r for r in records if r["arm"] in spec.arms]


def markdown(spec: Spec, records: Sequence[dict], failures: Sequence[dict], missing: Sequence[Key],
             png: Path = None) -> str:
    """The report's text (markdown)."""
    records = _records_of(spec, records)
    lines = [f"# Sweep {spec.name}", ""]
    if spec.about:
        lines += [spec.about, ""]
    planned = spec.runs_planned()
    lines.append(f"{len(records)} of {len(planned)} runs finished, {len(failures)} failed, {len(missing)} missing; "
                 f"results in `{spec.results}`.")
    if not records:
        return "\n".join(lines + ["", "No finished runs yet."]) + "\n"
    rows, info = setting_rows(records)
    tokens = sorted({r["tokens"] for r in records})
    lines += ["", f"Tokens per run: {', '.join(f'{t:,}' for t in tokens)}. Best fixed arm (lowest mean loss of "
                  f"those run on the most seeds): **{info['best']}**. Gaps are paired by seed (same data order "
                  "and initialisation): mean [min, max].", "",
              "| arm | seeds | val loss | vs best fixed (paired) | steps | windows taken (length:count) | "
              "B_simple q10/50/90, 2nd half | window/target | steps / frontier's | steps bound |",
              "|---|---:|---:|---|---:|---|---|---:|---:|---:|"]
    for row in rows:
        noise = "/".join(fmt(v, ".1f") for v in row["noise"]) if row["noise"] else "-"
        mark = " *" if row["best_k"] else ""
        lines.append(f"| {row['arm']}{mark} | {row['seeds']} | {row['val_loss']:.4f} | {spread_text(row['gap'])} | "
                     f"{row['steps']} | {row['windows']} | {noise} | {fmt(row['follow'], '.2f')} | "
                     f"{fmt(row['ratio'], '.2f')} | {fmt(row['bound'], '.2f')} |")
    lines += ["", "`*`: the best learning rate of its k. Windows, noise scale and steps are seed 0's. "
                  "`steps / frontier's`: the controller's optimizer steps over what the fixed arms' frontier "
                  "needs for its loss; `steps bound`: the least any batch schedule could take against the best "
                  "fixed batch given the noise scale the run measured (McCandlish et al.'s model).", "",
              "## Verdicts", ""]
    judged = spec.judge if spec.judge in by_arm(records) else None
    if judged:
        lines += [f"- {line}" for line in verdicts({spec.name: records}, judged)]
    else:
        lines.append("- no controller has finished a run yet: nothing to judge")
    if failures or missing:
        lines += ["", "## Not finished", ""]
        lines += [f"- {f['arm']}@s{f['seed']}: {f['status']}: {f['line']} (log: `{f['log']}`)" for f in failures]
        if missing:
            lines.append(f"- missing ({len(missing)}): {', '.join(run_name(k) for k in missing)}. A run killed with "
                         "its sweep, or a Slurm task cancelled or preempted, leaves no record: run the sweep "
                         "again (or resubmit with --slurm) and only these run")
    if png is not None:
        lines += ["", f"![sweep {spec.name}]({png.name})"]
    return "\n".join(lines) + "\n"


def plot_curves(axes, title: str, records: Sequence[dict], judge: str = None) -> None:
    """Seed 0's validation curves against tokens (``axes[0]``) and optimizer steps (``axes[1]``):
    the best fixed arm, ``judge``, every controller, and the fixed arms at 1x."""
    arms = by_arm(records)
    best = best_fixed(arms)
    shown = [a for a in arms if a in (best, judge) or (arms[a][0]["kind"] == "fixed" and a.endswith("@1"))]
    for arm in shown:
        curve = arms[arm][0].get("val_curve") or []
        style = "-" if arms[arm][0]["kind"] == "controller" else "--"
        label = arm + (" (best fixed)" if arm == best else "")
        axes[0].plot([c[0] for c in curve], [c[2] for c in curve], style, label=label)
        axes[1].plot([c[1] for c in curve], [c[2] for c in curve], style, label=label)
    for ax, unit in zip(axes, ("tokens", "optimizer steps")):
        ax.set(xlabel=unit, ylabel="val loss (nats/token)", title=f"{title}: val loss vs {unit} (seed 0)")
        ax.grid(alpha=0.3)
        if ax.lines:
            low = min(min(line.get_ydata(), default=float("inf")) for line in ax.lines)
            if low != float("inf"):
                ax.set_ylim(low - 0.05, low + 1.0)
            ax.legend(fontsize=7)
    axes[1].set_xscale("log")


def plot(spec: Spec, records: Sequence[dict], path: Path) -> Path:
    """The report's PNG: the curves, and each controller's window histogram (seed 0)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = _records_of(spec, records)
    fig, axes = plt.subplots(1, 3, figsize=(18, 4.6))
    plot_curves(axes[:2], spec.name, records, spec.judge)
    arms = by_arm(records)
    controllers = [a for a in arms if arms[a][0]["kind"] == "controller"]
    for i, arm in enumerate(controllers):
        windows = arms[arm][0]["windows"]
        lengths = sorted(int(n) for n in windows)
        width = 0.8 / len(controllers)
        axes[2].bar([n + i * width for n in lengths], [windows[str(n)] for n in lengths], width=width, label=arm)
    axes[2].set(xlabel="micro-batches per optimizer step", ylabel="optimizer steps (log)", yscale="log",
                title="windows the controllers took (seed 0)")
    if controllers:
        axes[2].legend(fontsize=7)
        axes[2].set_xticks(sorted({int(n) for a in controllers for n in arms[a][0]["windows"]}))
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path
