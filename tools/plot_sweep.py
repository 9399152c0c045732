#!/usr/bin/python3
"""Plots a `kvbounce sweep` report: throughput per path against the axis.

    plot_sweep.py SWEEP.json OUT.png OUT.svg

One line per path (GB/s of completed requests), the ceiling measured in the
same run as a dashed line, and every crossover (where one path overtakes
another between two points) marked and labelled. The x axis is logarithmic
when the values span a factor of 8 or more, the y axis when the throughputs
do (per-block of small fragments against bounce). A point whose run did not
verify is drawn hollow. Needs matplotlib (Debian: python3-matplotlib).
"""

import json
import math
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

COLORS = {"per-block": "#d62728", "bounce": "#1f77b4", "direct": "#2ca02c", "auto": "#9467bd"}


def series(rows):
    by_path = {}
    for r in rows:
        by_path.setdefault(r["path"], []).append(r)
    for path in by_path:
        by_path[path].sort(key=lambda r: r["x"])
    return by_path


def crossovers(a, b, logx):
    """Points where path a and path b swap order between consecutive x."""
    xa = {r["value"]: r for r in a}
    common = [r for r in b if r["value"] in xa]
    out = []
    for prev, cur in zip(common, common[1:]):
        d0 = xa[prev["value"]]["throughput_gbps"] - prev["throughput_gbps"]
        d1 = xa[cur["value"]]["throughput_gbps"] - cur["throughput_gbps"]
        if d0 == 0 or d1 == 0 or (d0 > 0) == (d1 > 0):
            continue
        t = d0 / (d0 - d1)
        x0, x1 = prev["x"], cur["x"]
        if logx and x0 > 0 and x1 > 0:
            x = math.exp(math.log(x0) + t * (math.log(x1) - math.log(x0)))
        else:
            x = x0 + t * (x1 - x0)
        y = prev["throughput_gbps"] + t * (cur["throughput_gbps"] - prev["throughput_gbps"])
        out.append((x, y))
    return out


def main(argv):
    if len(argv) != 4:
        sys.exit("usage: plot_sweep.py SWEEP.json OUT.png OUT.svg")
    with open(argv[1]) as f:
        report = json.load(f)
    rows = report["rows"]
    if not rows:
        sys.exit("the sweep has no rows")
    by_path = series(rows)
    xs = [r["x"] for r in rows if r["x"] > 0]
    logx = bool(xs) and max(xs) / min(xs) >= 8
    ys = [r["throughput_gbps"] for r in rows if r["throughput_gbps"] > 0]
    ceilings = [r["ceiling_gbps"] for r in rows if r["ceiling_gbps"] > 0]
    logy = bool(ys) and max(ys + ceilings) / min(ys) >= 20

    fig, ax = plt.subplots(figsize=(7.5, 4.5), dpi=100)
    for path, rs in sorted(by_path.items()):
        color = COLORS.get(path, None)
        x = [r["x"] for r in rs]
        y = [r["throughput_gbps"] for r in rs]
        ax.plot(x, y, "-", color=color, label=path, linewidth=1.8)
        for r in rs:
            ax.plot(r["x"], r["throughput_gbps"], "o", color=color,
                    markerfacecolor=color if r["verified"] else "white", markersize=5)
    # One ceiling per point: host-pool runs carry each its own paired
    # ceiling (measured beside that path's waves); the line is their mean.
    per_x = {}
    for r in rows:
        if r["ceiling_gbps"] > 0:
            per_x.setdefault(r["x"], []).append(r["ceiling_gbps"])
    ceiling = sorted((x, sum(v) / len(v)) for x, v in per_x.items())
    if ceiling:
        ax.plot([c[0] for c in ceiling], [c[1] for c in ceiling], "--", color="black",
                linewidth=1.2, label="ceiling")
    paths = [p for p in sorted(by_path) if p != "auto"]
    marked = False
    k = 0
    for i, a in enumerate(paths):
        for b in paths[i + 1:]:
            for x, y in crossovers(by_path[a], by_path[b], logx):
                ax.plot(x, y, "x", color="black", markersize=10, markeredgewidth=2,
                        label=None if marked else "crossover")
                marked = True
                ax.annotate(f"{a} = {b} @ {x:.3g}", (x, y), textcoords="offset points",
                            xytext=(8, 10 + 11 * (k % 4)), fontsize=7,
                            arrowprops={"arrowstyle": "-", "color": "#888888", "lw": 0.6})
                k += 1
    if logx:
        ax.set_xscale("log", base=2)
    if logy:
        ax.set_yscale("log")
    ax.set_xlabel(report.get("x_label", report["axis"]))
    ax.set_ylabel("throughput (GB/s)")
    title = f"kvbounce sweep: {report['axis']} ({report['transport']}, {report['memory']} memory)"
    ax.set_title(title, fontsize=11)
    scenario = rows[0].get("scenario", "")
    if scenario:
        fig.text(0.01, 0.01, "first point: " + scenario, fontsize=7, color="#555555")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    fig.tight_layout(rect=(0, 0.03, 1, 1))
    fig.savefig(argv[2], format="png", metadata={"Software": None})
    plt.rcParams["svg.hashsalt"] = "kvbounce"
    fig.savefig(argv[3], format="svg", metadata={"Date": None})


if __name__ == "__main__":
    main(sys.argv)
