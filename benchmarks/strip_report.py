"""The skull-stripping benchmark's outputs: the summary (mean Dice and
surface distance per contrast group, times, memory), strip.md, strip.png and
the metrics recorded in our model's metadata.json. Tables only: the scores
themselves come from :func:`synthtools.metrics.mask_scores` in the workers
of benchmarks/strip.py."""
from __future__ import annotations

import datetime as _dt
import statistics
import sys
from pathlib import Path

from benchmarks.common import version_of
from benchmarks.machine import cpu_name, set_model_metrics

GROUP_ORDER = ("T1", "T2", "FLAIR", "PD", "CT")


def flip_text(args) -> str:
    return f"{'with' if args.flip else 'no'} left-right test-time flip"


def _mean(xs):
    return sum(xs) / len(xs) if xs else None


def summarize(data: dict, methods: list[str], unavailable: dict[str, str]) -> dict:
    """Mean Dice per contrast group and overall (failures count as 0)."""
    cases = [c for c in data["cases"] if c["available"]]
    groups = [g for g in GROUP_ORDER if any(c["group"] == g for c in cases)]
    groups += sorted({c["group"] for c in cases} - set(groups))
    summary = {}
    for m in methods:
        if m in unavailable:
            summary[m] = {"status": "unavailable", "reason": unavailable[m]}
            continue
        res = data["results"][m]

        def scores(names):
            return [res[n]["dice"] if res.get(n, {}).get("status") == "ok" else 0.0 for n in names if n in res]

        per_group = {g: _mean(scores([c["name"] for c in cases if c["group"] == g])) for g in groups}
        # Surface distance: ok cases only (a failure has no boundary to measure).
        sd95 = {g: _mean([res[c["name"]]["sd95_mm"] for c in cases if c["group"] == g
                          and res.get(c["name"], {}).get("status") == "ok" and "sd95_mm" in res[c["name"]]])
                for g in groups}
        ok = [r for r in res.values() if r.get("status") == "ok"]
        summary[m] = {
            "status": "ok" if ok else "failed",
            "version": next((r.get("version") for r in ok), None) or (version_of(m) if m != "ours" else None),
            "cases_run": len(res), "cases_ok": len(ok),
            "failed": {n: f"{r['status']}: {r.get('error')}" for n, r in res.items() if r.get("status") != "ok"},
            "mean_dice_per_group": per_group,
            "mean_sd95_mm_per_group": sd95,
            "mean_dice_all_cases": _mean(scores([c["name"] for c in cases])),
            "mean_dice_of_group_means": _mean([v for v in per_group.values() if v is not None]),
            "median_run_s": statistics.median([r["run_s"] for r in ok]) if ok else None,
            "median_setup_s": statistics.median([r["setup_s"] for r in ok]) if ok else None,
            "median_wall_s": statistics.median([r["wall_s"] for r in ok]) if ok else None,
            "max_peak_rss_gb": max(r["peak_rss_gb"] for r in ok) if ok else None,
        }
    return {"groups": groups, "methods": summary}


def write_model_metrics(folder: Path, data: dict, summary: dict, methods: list[str], args) -> None:
    """Record the benchmark in the model's metadata.json (``metrics``):
    Dice per case and contrast for ours and every peer of this run. The
    weights' hash covers the weights only, so the model stays loadable."""

    def per_case(m, key="dice", digits=4):
        return {n: round(r[key], digits) for n, r in data["results"].get(m, {}).items()
                if r.get("status") == "ok" and key in r}
    ms = summary["methods"]
    metrics = {
        "description": "Dice (and the 95th-percentile surface distance, mm) vs reference brain masks on the "
                       "real validation cases (benchmarks/strip.py, "
                       f"border {args.border:g} mm, {flip_text(args)}, native grid; each case scored with the output matching its "
                       "reference's convention: csf or nocsf)",
        "date": _dt.date.today().isoformat(),
        "reference_convention": {c["name"]: c.get("brain", "csf") for c in data["cases"] if c["available"]},
        "dice": per_case("ours"),
        "surface_distance_95_mm": per_case("ours", "sd95_mm", 2),
        "mean_dice_per_contrast": {g: round(v, 4) for g, v in ms["ours"]["mean_dice_per_group"].items()
                                   if v is not None},
        "mean_dice_all_cases": round(ms["ours"]["mean_dice_all_cases"], 4),
    }
    for m in methods:
        if m != "ours" and ms[m].get("status") == "ok":
            metrics[f"peer_{m}_dice"] = per_case(m)
            metrics[f"peer_{m}_mean_dice_all_cases"] = round(ms[m]["mean_dice_all_cases"], 4)
    set_model_metrics(folder, metrics)


def fmt(x, spec=".3f", none="n/a"):
    return none if x is None else format(x, spec)


def _cell(r: dict | None, key: str, spec: str) -> str:
    if r is None:
        return "n/a"
    if r.get("status") != "ok":
        return r.get("status", "failed")
    return format(r[key], spec) if key in r else "n/a"  # e.g. reused from a run before the metric


def _case_rows(data: dict, cases: list[dict], groups: list[str], methods: list[str], key: str,
               spec: str) -> list[str]:
    """Table rows 'contrast | case | ref | one value per method', by contrast group."""
    return [f"| {g} | {c['name']} | {c.get('brain', 'csf')} | "
            + " | ".join(_cell(data["results"].get(m, {}).get(c["name"]), key, spec) for m in methods) + " |"
            for g in groups for c in cases if c["group"] == g]


def markdown(data: dict, summary: dict, methods: list[str], args, torch_version: str | None) -> str:
    cases = [c for c in data["cases"] if c["available"]]
    groups = summary["groups"]
    ms = summary["methods"]
    label = {m: (f"ours ({Path(str(args.model)).name})" if m == "ours" else m) for m in methods}
    versions = ", ".join(f"{m} {ms[m]['version']}" for m in methods
                         if m != "ours" and ms[m].get("version"))
    head = "| contrast | case | " + " | ".join(label[m] for m in methods) + " |"
    sep = "|---|---|" + "---:|" * len(methods)
    lines = [
        "# Skull-stripping benchmark", "",
        f"`python benchmarks/strip.py` on {_dt.date.today().isoformat()}: Dice against the reference brain mask "
        f"on the native grid (BrainWeb: cord below the foramen magnum excluded), one subprocess per method and "
        f"case, {args.threads} threads, CPU: {cpu_name()}, torch {torch_version}"
        + (f", {versions}" if versions else "") + f". Model: `{args.model}`, border {args.border:g} mm, {flip_text(args)}. "
        "A failure or time-out scores 0 in the means."
        + ("".join(f" {m}: results reused from `{src}` (an earlier run, same version and threads)."
                   for m, src in sorted({(m, r["reused_from"]) for m in methods
                                         for r in data["results"].get(m, {}).values() if r.get("reused_from")})))
        , "",
        "Reference masks follow one of two conventions (column 'ref'): `csf` = brain + CSF up to the skull "
        "(BrainWeb intracranial mask, SPM, CT), `nocsf` = brain without the CSF outside it (Lesjak, ROBEX, "
        "BrainWeb brain mask). Ours is scored with its matching output (`synthstrip`, `synthstrip --no-csf`) "
        "where the model has both; the peers have one convention each.", "",
        "## Dice per case", "", head.replace("| case |", "| case | ref |"), sep.replace("|---|---|", "|---|---|---|"),
    ]
    lines += _case_rows(data, cases, groups, methods, "dice", ".3f")
    lines += ["", "## Mean Dice per contrast", "",
              "| contrast | cases | " + " | ".join(label[m] for m in methods) + " |",
              "|---|---:|" + "---:|" * len(methods)]
    for g in groups:
        n = sum(c["group"] == g for c in cases)
        lines.append(f"| {g} | {n} | " + " | ".join(fmt(ms[m].get("mean_dice_per_group", {}).get(g))
                                                   for m in methods) + " |")
    lines.append(f"| **all cases** | {len(cases)} | "
                 + " | ".join(f"**{fmt(ms[m].get('mean_dice_all_cases'))}**" for m in methods) + " |")
    lines.append(f"| mean of contrast means | {len(groups)} | "
                 + " | ".join(fmt(ms[m].get("mean_dice_of_group_means")) for m in methods) + " |")
    lines += ["", "## 95th-percentile surface distance (mm)", "",
              "Symmetric, on the native grid (`synthtools.metrics.surface_distance_95`): on the thick-slice "
              "Lesjak scans a one-slice error costs 3-4 mm here and little Dice. The BrainWeb no-CSF "
              "reference is grey + white matter only, so its surface follows the sulci down to depths that "
              "every method's smooth mask bridges: large distances there measure that convention. Means "
              "over the cases a method ran.", "",
              head.replace("| case |", "| case | ref |"), sep.replace("|---|---|", "|---|---|---|")]
    lines += _case_rows(data, cases, groups, methods, "sd95_mm", ".2f")
    lines += ["", "| contrast (mean) | " + " | ".join(label[m] for m in methods) + " |",
              "|---|" + "---:|" * len(methods)]
    for g in groups:
        lines.append(f"| {g} | " + " | ".join(fmt(ms[m].get("mean_sd95_mm_per_group", {}).get(g), ".2f")
                                                 for m in methods) + " |")
    lines += ["", "## Time per case (s)", "",
              "Time of the call that makes the mask (image already in memory, model / tool set up; "
              "for brainextractor the numba cache load is included).", "",
              "| case | " + " | ".join(label[m] for m in methods) + " |", "|---|" + "---:|" * len(methods)]
    for g in groups:
        for c in (c for c in cases if c["group"] == g):
            lines.append(f"| {c['name']} | " + " | ".join(
                _cell(data["results"].get(m, {}).get(c["name"]), "run_s", ".1f") for m in methods) + " |")
    lines += ["", "## Per method", "",
              "| method | version | cases ok | mean Dice | median run (s) | median set-up (s) "
              "| median subprocess wall (s) | max peak RSS (GiB) |",
              "|---|---|---:|---:|---:|---:|---:|---:|"]
    for m in methods:
        s = ms[m]
        if s["status"] == "unavailable":
            lines.append(f"| {label[m]} | unavailable | 0 | n/a | n/a | n/a | n/a | n/a |")
            continue
        lines.append(f"| {label[m]} | {s.get('version') or '?'} | {s['cases_ok']}/{s['cases_run']} "
                     f"| {fmt(s['mean_dice_all_cases'])} | {fmt(s['median_run_s'], '.1f')} "
                     f"| {fmt(s['median_setup_s'], '.1f')} | {fmt(s['median_wall_s'], '.1f')} "
                     f"| {fmt(s['max_peak_rss_gb'], '.2f')} |")
    notes = [f"- {label[m]}: unavailable: {ms[m]['reason']}" for m in methods if ms[m]["status"] == "unavailable"]
    notes += [f"- {label[m]} on {n}: {why}" for m in methods for n, why in ms[m].get("failed", {}).items()]
    if notes:
        lines += ["", "## Not measured / failed", "", *notes]
    return "\n".join(lines) + "\n"


def plot(summary: dict, data: dict, methods: list[str], path: Path) -> bool:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("# matplotlib missing: no strip.png", file=sys.stderr)
        return False
    groups = summary["groups"]
    shown = [m for m in methods if summary["methods"][m]["status"] != "unavailable"]
    if not shown or not groups:
        print("# nothing measured: no strip.png", file=sys.stderr)
        return False
    cases = [c for c in data["cases"] if c["available"]]
    fig, ax = plt.subplots(figsize=(max(6.0, 1.4 * len(groups) * max(1, len(shown)) / 2 + 2), 4.2))
    width = 0.8 / max(1, len(shown))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for k, m in enumerate(shown):
        s = summary["methods"][m]
        xs = [i - 0.4 + width * (k + 0.5) for i in range(len(groups))]
        ys = [s["mean_dice_per_group"].get(g) or 0.0 for g in groups]
        ax.bar(xs, ys, width * 0.92, label=m, color=colors[k % len(colors)])
        res = data["results"][m]
        for x, g in zip(xs, groups):
            pts = [res[c["name"]]["dice"] if res[c["name"]].get("status") == "ok" else 0.0
                   for c in cases if c["group"] == g and c["name"] in res]
            ax.scatter([x] * len(pts), pts, s=10, color="black", zorder=3)
    ax.set_xticks(range(len(groups)))
    ax.set_xticklabels([f"{g}\n(n={sum(c['group'] == g for c in cases)})" for g in groups])
    ax.set_ylim(0, 1.12)
    ax.set_yticks([0, 0.2, 0.4, 0.6, 0.8, 1.0])
    ax.set_ylabel("Dice (mean; dots: cases, failure = 0)")
    ax.set_title("Skull-stripping: Dice per contrast")
    ax.legend(loc="upper center", fontsize=8, ncol=len(shown), frameon=False)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True
