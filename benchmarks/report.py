"""The benchmark's figures: summaries, the printed tables with their ratios, the JSON beside the
plot (so the docs can cite numbers), and the plot itself (wall and CPU per host against K)."""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

from benchmarks.measure import Sample

TOOLS = ("ours", "no-op", "floor", "ansible")
LABELS = {"ours": "ours (changing)", "no-op": "ours (no-op)", "floor": "floor", "ansible": "Ansible"}


def summary(samples: list[Sample], k: int) -> dict:
    """Median and spread of wall; median CPU per host (ms); peaks over the runs."""
    walls = [s.wall for s in samples]
    return {"runs": len(samples), "wall_median": statistics.median(walls), "wall_min": min(walls),
            "wall_max": max(walls), "cpu_per_host_ms": statistics.median(s.cpu for s in samples) / k * 1000,
            "rss_mib": max(s.rss_mib for s in samples), "threads": max(s.threads for s in samples),
            "fds": max(s.fds for s in samples), "samples": [s.as_dict() for s in samples]}


def ratios(sizes: dict[int, dict[str, dict]]) -> dict:
    """ours/floor wall per K, no-op/changing, Ansible/ours, and CPU per host at the largest K against K = 50."""
    out: dict = {"ours_over_floor": {}, "noop_over_changing": {}, "ansible_over_ours": {}}
    for k, res in sizes.items():
        ours = res["ours"]["wall_median"]
        out["ours_over_floor"][k] = ours / res["floor"]["wall_median"]
        out["noop_over_changing"][k] = res["no-op"]["wall_median"] / ours
        if "ansible" in res:
            out["ansible_over_ours"][k] = res["ansible"]["wall_median"] / ours
    big = max(sizes, default=0)
    if 50 in sizes and big > 50:
        growth = {tool: sizes[big][tool]["cpu_per_host_ms"] / sizes[50][tool]["cpu_per_host_ms"]
                  for tool in ("ours", "floor")}
        out["cpu_per_host_growth"] = {"from": 50, "to": big, **growth}
    return out


def table(sizes: dict[int, dict[str, dict]], known_hosts: dict | None, skipped: list[int], header: str) -> str:
    lines = [header, f"{'K':>4} {'tool':<16} {'median s':>9} {'min-max s':>13} {'CPU/host ms':>12} "
             f"{'peak RSS MiB':>13} {'threads':>8} {'fds':>6}"]
    for k, res in sizes.items():
        for tool in TOOLS:
            if tool in res:
                r = res[tool]
                spread = f"{r['wall_min']:.2f}-{r['wall_max']:.2f}"
                lines.append(f"{k:>4} {LABELS[tool]:<16} {r['wall_median']:>9.2f} "
                             f"{spread:>13} {r['cpu_per_host_ms']:>12.1f} "
                             f"{r['rss_mib']:>13.1f} {r['threads']:>8} {r['fds']:>6}")
    rat = ratios(sizes)
    lines += ["", f"{'K':>4} {'ours/floor':>11} {'no-op/changing':>15} {'Ansible/ours':>13}"]
    for k in sizes:
        an = rat["ansible_over_ours"].get(k)
        shown = f"{an:.1f}x" if an else "-"
        lines.append(f"{k:>4} {rat['ours_over_floor'][k]:>11.2f} {rat['noop_over_changing'][k]:>15.2f} {shown:>13}")
    if "cpu_per_host_growth" in rat:
        g = rat["cpu_per_host_growth"]
        lines.append(f"CPU per host at K={g['to']} vs K={g['from']}: ours {g['ours']:.2f}x, floor {g['floor']:.2f}x")
    if skipped:
        lines.append(f"Ansible skipped at K={','.join(map(str, skipped))} (above --ansible-up-to: it is slow there)")
    if known_hosts:
        kh = known_hosts
        lines.append(f"known_hosts at K={kh['k']}: the fleet's {kh['small_lines']} lines "
                     f"{kh['small']['wall_median']:.2f}s, "
                     f"{kh['big_lines']} lines {kh['big']['wall_median']:.2f}s median "
                     f"(ratio {kh['ratio']:.3f}; paired per run {', '.join(f'{x:.3f}' for x in kh['paired'])})")
    return "\n".join(lines)


def known_hosts_summary(k: int, small: list[Sample], big: list[Sample], small_lines: int, big_lines: int) -> dict:
    s, b = summary(small, k), summary(big, k)
    return {"k": k, "small_lines": small_lines, "big_lines": big_lines, "small": s, "big": b,
            "ratio": b["wall_median"] / s["wall_median"],
            "paired": [y.wall / x.wall for x, y in zip(small, big, strict=True)]}


def write_json(path: Path, meta: dict, sizes: dict[int, dict[str, dict]], known_hosts: dict | None) -> None:
    doc = {**meta, "sizes": {str(k): v for k, v in sizes.items()}, "ratios": ratios(sizes), "known_hosts": known_hosts}
    path.write_text(json.dumps(doc, indent=1, sort_keys=False) + "\n")


def plot(path: Path, sizes: dict[int, dict[str, dict]], title: str) -> None:
    """Two panels, log x: wall (median, with min-max bars) and CPU per host, ours against the floor."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ks = sorted(sizes)
    fig, (wall, cpu) = plt.subplots(1, 2, figsize=(9, 3.6), dpi=100)
    for tool, style in (("ours", "o-"), ("floor", "s--")):
        med = [sizes[k][tool]["wall_median"] for k in ks]
        err = [[m - sizes[k][tool]["wall_min"] for k, m in zip(ks, med, strict=True)],
               [sizes[k][tool]["wall_max"] - m for k, m in zip(ks, med, strict=True)]]
        wall.errorbar(ks, med, yerr=err, fmt=style, capsize=3, label=LABELS[tool])
        cpu.plot(ks, [sizes[k][tool]["cpu_per_host_ms"] for k in ks], style, label=LABELS[tool])
    for ax, ylabel in ((wall, "wall s (median, min-max)"), (cpu, "controller CPU per host, ms")):
        ax.set_xscale("log")
        ax.set_xticks(ks, [str(k) for k in ks])
        ax.minorticks_off()
        ax.set_xlabel("hosts K")
        ax.set_ylabel(ylabel)
        ax.grid(True, alpha=0.3)
        ax.legend()
    wall.set_yscale("log")
    cpu.set_yscale("log")  # K = 1 is mostly start-up, ten times the per-host cost at K >= 50
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main(json_path: str, png_path: str) -> int:
    """Plot from the JSON, in a process of its own: matplotlib in the benchmark's process would show in
    the peak RSS of every tool it starts after (a child's peak counts what it shared before its exec)."""
    doc = json.loads(Path(json_path).read_text())
    sizes = {int(k): v for k, v in doc["sizes"].items()}
    if sizes:
        plot(Path(png_path), sizes, f"make bench, {doc['date']}, hosts local, median of {doc['runs']}")
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:3]))
