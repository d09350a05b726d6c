"""PNG charts of a run's results (matplotlib, Agg backend), written next to
the results markdown, which links them by file name.

* ``STEM-throughput-CIPHER.png``: MB/s per path and direction, grouped bars
  (median) with min-max whiskers, one chart per cipher setting;
* ``STEM-login-latency.png``: login time per path, every sample (box plot);
* ``STEM-idle-rss.png``: the bastion's memory against idle sessions;
* ``STEM-scale.png``: parallel downloads and logins per second with many
  clients, OpenSSH against the bastion with one and two workers.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt

from bench.plan import DIRECTIONS, LOGIN_PATHS, PATHS, SHORT_NAMES
from bench.targets import CIPHER_NAMES, get

COLORS = {
    "openssh_direct": "#9e9e9e",
    "openssh_jump": "#616161",
    "openssh_nested": "#212121",
    "bastion": "#1565c0",
    "bastion_jump": "#64b5f6",
    "bastion_fresh": "#2e7d32",
    "bastion_fresh_w1": "#66bb6a",
    "bastion_fresh_w2": "#1b5e20",
}


def _label(path: str) -> str:
    return SHORT_NAMES.get(path, path).replace("\n", " ")


def _bars(ax: Any, groups: list[str], series: dict[str, list[dict[str, Any] | None]]) -> None:
    """Grouped bars: one group per entry of ``groups``, one bar per series
    (a summary dict with median, min, max, or None)."""
    width = 0.8 / max(len(series), 1)
    for i, (path, stats) in enumerate(series.items()):
        xs, heights, lo, hi = [], [], [], []
        for g, s in enumerate(stats):
            if s is None:
                continue
            xs.append(g + (i - (len(series) - 1) / 2) * width)
            heights.append(s["median"])
            lo.append(s["median"] - s["min"])
            hi.append(s["max"] - s["median"])
        if not xs:
            continue
        ax.bar(
            xs,
            heights,
            width,
            yerr=[lo, hi],
            capsize=3,
            label=_label(path),
            color=COLORS.get(path),
            edgecolor="black",
            linewidth=0.5,
        )
        for x, h in zip(xs, heights, strict=True):
            ax.annotate(f"{h:.0f}", (x, h), ha="center", va="bottom", fontsize=6, rotation=90)
    ax.set_xticks(range(len(groups)), groups)
    ax.set_ylim(0, ax.get_ylim()[1] * 1.15)  # room for the legend
    ax.grid(axis="y", alpha=0.3)


def _throughput(results: dict[str, Any], cipher: str, out: Path) -> bool:
    tp = get(results, "throughput", cipher)
    if not tp:
        return False
    fig, ax = plt.subplots(figsize=(9, 4.5))
    series = {p: [get(tp, d, p, "mb_s") for d in DIRECTIONS] for p in PATHS}
    _bars(ax, ["download", "upload", "both ways"], series)
    ax.set_ylabel("MB/s (median, whiskers min-max)")
    label = "aes128-gcm@openssh.com" if cipher == "aes128-gcm" else "OpenSSH's default cipher"
    ax.set_title(f"Throughput to host-102, {label}")
    ax.legend(fontsize=7, ncol=5, loc="upper right")
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return True


def _latency(results: dict[str, Any], out: Path) -> bool:
    paths = get(results, "login", "paths") or {}
    names = [p for p in LOGIN_PATHS if get(paths, p, "samples_ms")]
    if not names:
        return False
    fig, ax = plt.subplots(figsize=(9, 4.5))
    box = ax.boxplot(
        [paths[p]["samples_ms"] for p in names],
        patch_artist=True,
        showfliers=True,
        widths=0.6,
    )
    for patch, p in zip(box["boxes"], names, strict=True):
        patch.set_facecolor(COLORS.get(p, "#cccccc"))
        patch.set_alpha(0.7)
    ax.set_xticks(range(1, len(names) + 1), [SHORT_NAMES.get(p, p) for p in names], fontsize=8)
    ax.set_yscale("log")
    ax.set_ylabel("ms per `ssh host true` (log scale)")
    ax.set_title("Login latency (curve25519, aes128-gcm), every sample")
    ax.grid(axis="y", alpha=0.3, which="both")
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return True


def _idle(results: dict[str, Any], out: Path) -> bool:
    points = get(results, "scale", "idle", "points") or []
    pty = get(results, "concurrency", "idle", "bastion")
    if not points and not pty:
        return False
    fig, ax = plt.subplots(figsize=(7, 4.5))
    if points:
        xs = [p["sessions"] for p in points]
        ax.plot(xs, [p["rss_mb"] for p in points], "o-", label="RSS, all bastion processes")
        ax.plot(xs, [p["pss_mb"] for p in points], "s--", label="PSS, all bastion processes")
    if pty:
        ax.plot([pty["sessions"]], [pty["rss_mb"]], "^", label="RSS, PTY shells (stack bastion)")
    ax.axhline(400, color="red", linestyle=":", label="target at 10,000: 400 MB")
    ax.set_xlabel("idle sessions through the bastion")
    ax.set_ylabel("MB")
    ax.set_ylim(bottom=0)
    ax.set_title("Bastion memory against idle sessions")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return True


def _scale(results: dict[str, Any], out: Path) -> bool:
    par = get(results, "scale", "parallel_downloads")
    logins = get(results, "scale", "logins")
    if not par and not logins:
        return False
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.5))
    if par:
        counts = [k for k in par if k.isdigit()]
        names = [p for p in COLORS if any(get(par, c, p) for c in counts)]
        series = {p: [get(par, c, p, "mb_s") for c in counts] for p in names}
        _bars(left, [f"{c} downloads" for c in counts], series)
        left.set_ylabel("aggregate MB/s (median, min-max)")
        left.set_title(f"Parallel downloads, {par.get('cipher')}")
        left.legend(fontsize=7)
    if logins:
        names = [p for p in COLORS if isinstance(logins.get(p), dict)]
        rates = [logins[p]["logins_per_s"] for p in names]
        right.bar(
            range(len(names)),
            rates,
            color=[COLORS[p] for p in names],
            edgecolor="black",
            linewidth=0.5,
        )
        right.set_xticks(range(len(names)), [SHORT_NAMES[p] for p in names], fontsize=7)
        right.set_ylabel("logins/s")
        right.set_title(f"Fresh logins, {logins.get('clients')} parallel clients")
        right.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return True


def write(results: dict[str, Any], out_dir: Path, stem: str) -> dict[str, str]:
    """Draw every chart the results have data for; {chart: file name}."""
    out_dir.mkdir(parents=True, exist_ok=True)
    written: dict[str, str] = {}

    def save(chart: str, drawn: Callable[[Path], bool]) -> None:
        name = f"{stem}-{chart}.png"
        if drawn(out_dir / name):
            written[chart] = name

    for cipher in CIPHER_NAMES:
        save(f"throughput-{cipher}", functools.partial(_throughput, results, cipher))
    save("login-latency", functools.partial(_latency, results))
    save("idle-rss", functools.partial(_idle, results))
    save("scale", functools.partial(_scale, results))
    return written
