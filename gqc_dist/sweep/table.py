"""What a sweep (``gqc-train sweep``, and its presets in ``benchmarks/efficiency.py``) concludes
from its runs: pure functions of the compact result records (one small JSON per run), so that
reports and the tables of benchmarks/README.md rebuild without rerunning and the logic is tested on synthetic
runs (``tests/test_efficiency_table.py``).

A record is ``{"setting", "arm", "seed", "kind", "k", "lr_multiplier", "val_loss",
"optimizer_steps", "micro_steps", "tokens", "windows": {length: count}, "noise_scale": {...},
"target": {...}, ...}`` (see :mod:`gqc_dist.sweep.records`). ``kind`` is ``fixed`` (``k``
micro-batches per step, possibly fractional, at ``lr_multiplier`` times the setting's base
learning rate under the square-root coupling), ``controller``, or ``twin``: a fixed arm ``<arm>-twin``
run again with its learning rate nudged by a part in a million, whose paired gap to ``<arm>``
is the benchmark's noise floor (never a candidate for the best fixed arm).
"""

import math
from statistics import mean
from typing import Dict, Iterable, List, Optional, Sequence, Tuple


def by_arm(records: Iterable[dict]) -> Dict[str, List[dict]]:
    """Records grouped by arm, each list sorted by seed."""
    out: Dict[str, List[dict]] = {}
    for record in records:
        out.setdefault(record["arm"], []).append(record)
    return {arm: sorted(runs, key=lambda r: r["seed"]) for arm, runs in out.items()}


def _steadiest(arms: Dict[str, List[dict]], names: Iterable[str]) -> str:
    """Of ``names``, the arm with the lowest mean final loss among those run on the most seeds."""
    names = list(names)
    most = max(len(arms[name]) for name in names)
    return min((name for name in names if len(arms[name]) == most),
               key=lambda name: mean(r["val_loss"] for r in arms[name]))


def _fixed(arms: Dict[str, List[dict]]) -> Dict[str, List[dict]]:
    return {arm: runs for arm, runs in arms.items() if runs[0]["kind"] == "fixed" and runs[0]["seed"] == 0}


def best_fixed_per_k(arms: Dict[str, List[dict]]) -> Dict[float, str]:
    """For every fixed ``k``, its best arm (learning rate) by the rule of :func:`best_fixed`."""
    fixed = _fixed(arms)
    ks = sorted({runs[0]["k"] for runs in fixed.values()})
    return {k: _steadiest(fixed, [arm for arm, runs in fixed.items() if runs[0]["k"] == k]) for k in ks}


def best_fixed(arms: Dict[str, List[dict]]) -> Optional[str]:
    """The fixed arm (``k`` and learning rate) the controllers are judged against: of the fixed
    arms run on the most seeds, the one with the lowest mean final loss. Until seeds are added
    that is the lowest seed-0 loss, the arm that then gets them; a rate that won on seed 0 and
    diverges on another seed loses to a steadier arm that was run on as many seeds."""
    fixed = _fixed(arms)
    return _steadiest(fixed, fixed) if fixed else None


def frontier(points: Sequence[Tuple[float, float]]) -> List[Tuple[float, float]]:
    """The Pareto frontier of ``(optimizer steps, final loss)`` points, by rising steps and
    falling loss: a point is dropped when one with at most its steps ends at least as low."""
    kept: List[Tuple[float, float]] = []
    for steps, loss in sorted(points):
        if not kept or loss < kept[-1][1]:
            kept.append((steps, loss))
    return kept


def steps_on_frontier(loss: float, points: Sequence[Tuple[float, float]]) -> float:
    """Optimizer steps the fixed frontier needs to end at ``loss``: linear in log-steps between
    the two frontier points whose losses bracket it; ``nan`` outside the measured range."""
    front = frontier(points)
    for (s0, l0), (s1, l1) in zip(front, front[1:]):  # steps rise, loss falls
        if l1 <= loss <= l0:
            t = (loss - l0) / (l1 - l0) if l0 != l1 else 0.0
            return math.exp(math.log(s0) + t * (math.log(s1) - math.log(s0)))
    if front and any(abs(loss - l) < 1e-12 for _, l in front):
        return next(s for s, l in front if abs(loss - l) < 1e-12)
    return math.nan


def adaptive_steps_bound(windows: Iterable[Tuple[int, Optional[float]]]) -> float:
    """The fewest optimizer steps any batch schedule could take, as a fraction of the best fixed
    batch's at the same tokens and the same loss, in McCandlish et al.'s (2018) model, given the
    noise scale a run measured along its way: what noise adaptation alone can save there.

    ``windows``: ``(micro-batches, noise scale in micro-batches)`` per optimizer step of the run;
    a step without a finite estimate is left out.

    Model: a step on ``B`` micro-batches where the noise scale is ``N`` makes ``p = 1 / (1 + N/B)``
    of a noiseless step's progress, so the run traces ``N`` against progress ``P = sum p`` for its
    tokens ``E = sum B``. At equal ``E`` and ``P``, a fixed batch ``B_f = (E - sum N p) / P``
    takes ``P (1 + X)`` steps, ``X = mean_p(N) / B_f``; the best schedule, ``B`` in proportion to
    ``sqrt(N)``, takes ``P (1 + X rho)`` with ``rho = mean_p(sqrt N)^2 / mean_p(N) <= 1``
    (Cauchy-Schwarz). Returned: ``(1 + X rho) / (1 + X)``; 1 where ``N`` is constant. A batch in
    proportion to ``N`` (CBC's ``kappa * B_simple``) takes exactly the fixed batch's steps here."""
    pairs = [(b, max(n, 0.0)) for b, n in windows if n is not None and math.isfinite(n)]
    progress = [b / (b + n) for b, n in pairs]
    total = sum(progress)
    if not pairs or total <= 0:
        return math.nan
    mean_n = sum(n * p for (_, n), p in zip(pairs, progress)) / total
    mean_root = sum(math.sqrt(n) * p for (_, n), p in zip(pairs, progress)) / total
    if mean_n == 0:
        return 1.0
    fixed_batch = sum(b for b, _ in pairs) / total - mean_n
    x, rho = mean_n / fixed_batch, mean_root ** 2 / mean_n
    return (1 + x * rho) / (1 + x)


def paired_gaps(runs: Sequence[dict], reference: Sequence[dict]) -> List[float]:
    """``loss / reference loss - 1`` per seed both have (paired: same data order and init)."""
    ref = {r["seed"]: r["val_loss"] for r in reference}
    return [r["val_loss"] / ref[r["seed"]] - 1 for r in runs if r["seed"] in ref]


def histogram_text(windows: Dict[str, int], limit: int = 6) -> str:
    """``{length: count}`` as ``1:1430 2:60 ...``: the ``limit`` most common lengths in length
    order, then ``+N more``."""
    items = sorted(windows.items(), key=lambda kv: -kv[1])[:limit]
    text = " ".join(f"{int(n)}:{c}" for n, c in sorted(items, key=lambda kv: int(kv[0])))
    rest = len(windows) - len(items)
    return text + (f" +{rest} more" if rest > 0 else "")


def share_of_ones(windows: Dict[str, int]) -> float:
    total = sum(windows.values())
    return windows.get("1", 0) / total if total else math.nan


def fmt(value, spec: str) -> str:
    """A number, or ``-`` where it does not apply."""
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else format(value, spec)


def spread_text(values: Sequence[float], percent: bool = True) -> str:
    """``mean [min, max] (n)`` of paired gaps (in percent) or of plain values."""
    if not values:
        return "-"
    scale, unit = (100, "%") if percent else (1, "")
    if len(values) == 1:
        return f"{scale * values[0]:+.2f}{unit} (1 seed)" if percent else f"{values[0]:.4f}"
    return (f"{scale * mean(values):+.2f}{unit} [{scale * min(values):+.2f}, {scale * max(values):+.2f}] "
            f"({len(values)} seeds)")


def setting_rows(records: Iterable[dict]) -> Tuple[List[dict], dict]:
    """One row per arm of one setting and the setting's verdict inputs.

    Row: ``arm``, ``kind``, ``seeds``, ``val_loss`` (mean over seeds), ``gap`` (paired gaps to
    the best fixed arm), ``steps`` and ``micro_steps`` (seed 0), ``windows`` (histogram text,
    seed 0), ``ones`` (share of windows of one), ``noise`` (B_simple q10/q50/q90 over the second
    half, micro-batches), ``follow`` (mean window / mean kappa*B_simple over the second half),
    ``frontier_steps`` (steps the fixed frontier needs for the row's seed-0 loss), ``ratio`` and
    ``bound`` (the record's ``steps_bound``, seed 0).
    """
    arms = by_arm(records)
    best = best_fixed(arms)
    per_k = best_fixed_per_k(arms)
    points = [(arms[a][0]["optimizer_steps"], arms[a][0]["val_loss"]) for a in per_k.values()]
    rows = []
    for arm, runs in sorted(arms.items(), key=lambda kv: _order(kv[1][0])):
        first = runs[0]
        loss = first["val_loss"]
        need = steps_on_frontier(loss, points) if first["kind"] == "controller" else math.nan
        noise = first.get("noise_scale", {}).get("second_half")
        target = first.get("target", {})
        label = arm
        if first["kind"] == "controller" and first.get("lr_multiplier"):
            label = f"{arm}@{first['lr_multiplier']:g}"  # the learning rate it ran at (k = 1's best)
        rows.append({
            "arm": label, "kind": first["kind"], "seeds": len(runs),
            "val_loss": mean(r["val_loss"] for r in runs),
            "gap": paired_gaps(runs, arms[best]) if best else [],
            "steps": first["optimizer_steps"], "micro_steps": first["micro_steps"],
            "windows": histogram_text(first["windows"]), "ones": share_of_ones(first["windows"]),
            "noise": noise, "follow": target.get("follow_second_half"),
            "frontier_steps": need, "ratio": first["optimizer_steps"] / need if need == need else math.nan,
            "best_k": first["kind"] == "fixed" and per_k.get(first["k"]) == arm,
            "bound": first.get("steps_bound"),
        })
    return rows, {"best": best, "best_per_k": per_k, "frontier": frontier(points)}


def _order(record: dict):
    kind = {"fixed": 0, "twin": 0, "controller": 1}[record["kind"]]  # a twin next to its arm
    return (kind, record.get("k") or 0, record.get("lr_multiplier") or 0, record["arm"])


def table_text(setting: str, about: str, tokens: int, records: Sequence[dict]) -> str:
    """The printed table of one setting (benchmarks/README.md's)."""
    rows, info = setting_rows(records)
    lines = [f"{setting}: {about}; {tokens:,} tokens per run; best fixed: {info['best']}",
             f"{'run':30} {'seeds':>5} {'val loss':>8} {'vs best fixed (paired)':>34} {'steps':>6} "
             f"{'windows taken (length:count)':>32} {'B_simple q10/50/90, 2nd half':>28} "
             f"{'window/target':>13} {'frontier steps':>14} {'ratio':>6}"]
    for row in rows:
        noise = "/".join(fmt(v, ".1f") for v in row["noise"]) if row["noise"] else "-"
        mark = "*" if row["best_k"] else " "
        lines.append(
            f"{row['arm'] + mark:30} {row['seeds']:5d} {row['val_loss']:8.4f} {spread_text(row['gap']):>34} "
            f"{row['steps']:6d} {row['windows']:>32} {noise:>28} {fmt(row['follow'], '.2f'):>13} "
            f"{fmt(row['frontier_steps'], '.0f'):>14} {fmt(row['ratio'], '.2f'):>6}")
    return "\n".join(lines)


def verdicts(settings: Dict[str, Sequence[dict]], controller: str, tuning_free: Optional[str] = None,
             previous: Sequence[Tuple[str, Optional[str]]] = ()) -> List[str]:
    """The issue's targets, each a line saying met or missed with its numbers:

    * tuning-free: in every setting the default controller's worst paired gap to the best fixed
      (k, lr) is at most +1%, while every fixed k at one lr (the same arm, ``fixed{k}@{m}``, in
      every setting) is >= 3% behind somewhere;
      said for ``controller`` (at the learning rate it ran at: fixed k = 1's best on seed 0) and,
      where it ran, for ``tuning_free`` (the same controller at one learning rate in every
      setting), which stands for both where seeds added later made its rate k = 1's best;
    * steps: where B_simple's second-half median is >= 4 micro-batches, the controller takes at
      most 0.7x the frontier's steps at its loss; with the record's ``steps_bound``
      (:func:`adaptive_steps_bound`), the least any schedule could take in the model;
    * adaptation: where it is below 1, >= 95% of windows take one and the loss is within 0.3%
      of fixed k=1 (at its best lr); where it is >= 4, the mean window is within 30% of
      kappa * B_simple;
    * and, where twins ran, the noise floor: the largest paired gap between a twin and its arm; a
      missed worst seed no larger than it is said to be inside it (the setting cannot resolve it).

    ``previous``: earlier ``(controller, tuning_free)`` defaults, judged (and named) in a setting
    where ``controller`` did not run.
    """
    out = []
    one_rate: Dict[str, List[Tuple[float, str]]] = {}  # fixed arm -> (worst paired gap, setting) per setting
    for setting, records in settings.items():
        arms = by_arm(records)
        best = best_fixed(arms)
        per_k = best_fixed_per_k(arms)
        for arm in _fixed(arms) if best else ():
            one_rate.setdefault(arm, []).append((max(paired_gaps(arms[arm], arms[best])), setting))
        floor = 0.0  # the largest paired gap between twins: what this setting cannot resolve
        for twin in (a for a in arms if arms[a][0]["kind"] == "twin"):
            arm = twin[:-len("-twin")]
            if arm not in arms:
                continue
            gaps = [abs(gap) for gap in paired_gaps(arms[twin], arms[arm])]
            floor = max(floor, *gaps)
            out.append(f"{setting}: noise floor: {twin} (learning rate nudged) vs {arm}: largest paired gap "
                       f"{100 * max(gaps):.4f}% ({len(gaps)} seed{'s' * (len(gaps) > 1)})")
        ran = next(((c, t) for c, t in ((controller, tuning_free), *previous) if c in arms), None)
        if ran is None or best is None:
            out.append(f"{setting}: no {controller} runs or no fixed runs yet")
            continue
        if ran[0] != controller:
            out.append(f"{setting}: {controller} did not run here; the previous default {ran[0]} stands in")
        here, here_free = ran
        # the controller ran at k = 1's best rate as seed 0 picked it; where more seeds moved k = 1's
        # best to the rate of its one-rate run, that run is the one tuned as k = 1
        k1_rate = arms[per_k[1]][0]["lr_multiplier"] if 1 in per_k else None
        ran_rate = arms[here][0].get("lr_multiplier")
        if here_free in arms and ran_rate != k1_rate and arms[here_free][0].get("lr_multiplier") == k1_rate:
            out.append(f"{setting}: on more seeds fixed k=1's best rate is {k1_rate:g}x, not the "
                       f"{fmt(ran_rate, 'g')}x {here} ran at: {here_free} is the one tuned as k=1")
            here = here_free
        runs = arms[here]
        # where k = 1's best rate is the base rate, the controller's runs (all its seeds) are the
        # tuning-free ones
        same = runs[0].get("lr_multiplier") == 1
        claims = [("tuned as k=1", here)] + ([("tuning-free", here if same else here_free)] if here_free else [])
        for claim, arm in claims:
            if arm in arms:
                gaps = paired_gaps(arms[arm], arms[best])
                worst = max(gaps) if gaps else math.nan
                lr = f"{arms[arm][0].get('lr_multiplier') or 1:g}x base lr"
                unresolved = f"; inside the noise floor ({100 * floor:.2f}%)" if 0.01 < worst <= floor else ""
                out.append(f"{setting}: {claim}: {arm} ({lr}) vs best fixed {best}: {spread_text(gaps)} -> "
                           f"{'met' if worst <= 0.01 else 'MISSED'} (target: worst seed <= +1.00%){unresolved}")
        first = runs[0]
        median = (first.get("noise_scale", {}).get("second_half") or [math.nan] * 3)[1]
        if median >= 4:
            points = [(arms[a][0]["optimizer_steps"], arms[a][0]["val_loss"]) for a in per_k.values()]
            need = steps_on_frontier(first["val_loss"], points)
            ratio = first["optimizer_steps"] / need if need == need else math.nan
            verdict = "not measured: the fixed arms here do not bracket its loss" if ratio != ratio else \
                "met" if ratio <= 0.7 else "MISSED"
            bound = first.get("steps_bound")  # what noise adaptation could save at best, given its N
            reach = "" if bound is None else (f"; the noise scale it measured lets no batch schedule go below "
                                              f"{bound:.2f}x the best fixed batch's steps (McCandlish's model)")
            out.append(f"{setting}: steps: B_simple median {median:.1f} micro-batches; {here} "
                       f"{first['optimizer_steps']} steps, frontier {fmt(need, '.0f')} at its loss: ratio "
                       f"{fmt(ratio, '.2f')} -> {verdict} (target <= 0.70){reach}")
            follow = first.get("target", {}).get("follow_second_half", math.nan)
            out.append(f"{setting}: adaptation: mean window / kappa*B_simple over the second half {fmt(follow, '.2f')}"
                       f" -> {'met' if abs(follow - 1) <= 0.3 else 'MISSED'} (target within 30%)")
        elif median < 1:
            ones = share_of_ones(first["windows"])
            k1 = per_k.get(1)
            gap = mean(paired_gaps(runs, arms[k1])) if k1 else math.nan
            met = ones >= 0.95 and gap <= 0.003
            out.append(f"{setting}: adaptation: B_simple median {median:.2f} micro-batches; windows of one "
                       f"{100 * ones:.1f}%, loss vs fixed k=1 {100 * gap:+.2f}% -> {'met' if met else 'MISSED'} "
                       "(targets: >= 95%, within 0.3%)")
        else:
            out.append(f"{setting}: B_simple median {median:.2f} micro-batches: between the regimes the "
                       "adaptation targets name")
    everywhere = {arm: max(gaps) for arm, gaps in one_rate.items() if len(gaps) == len(settings)}
    if everywhere and len(settings) > 1:  # the fixed arm at one rate that comes closest to tuning-free
        arm = min(everywhere, key=lambda a: everywhere[a][0])
        gap, setting = everywhere[arm]
        count = f"{len(everywhere)} arm{'s' * (len(everywhere) > 1)}"
        out.append(f"fixed k at one learning rate ({count} run in every setting): the closest, {arm}, "
                   f"is {100 * gap:+.2f}% behind in {setting} -> {'met' if gap >= 0.03 else 'MISSED'} "
                   "(target: every one >= +3% behind somewhere)")
    return out
