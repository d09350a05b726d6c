"""``python -m bench.run --quick`` runs end to end on the real stack and writes
every section of the results and its charts; numbers are checked for presence
and sign only (timing depends on the machine, so nothing here asserts a
speed)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent
PATHS = ("openssh_direct", "openssh_jump", "openssh_nested", "bastion", "bastion_jump")
LOGIN_PATHS = (*PATHS, "bastion_fresh")  # logins also with upstream reuse off
RATE_PATHS = ("openssh_direct", "openssh_jump", "bastion", "bastion_jump", "bastion_fresh")
CHARTS = ("throughput-aes128-gcm", "throughput-default", "login-latency", "idle-rss", "scale")


def positive(value: Any, where: str) -> None:
    assert isinstance(value, int | float) and not isinstance(value, bool), where
    assert value > 0, f"{where} = {value}"


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_quick_bench_writes_every_section(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "bench.run", "--quick", "--out", str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=290,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = json.loads((tmp_path / "quick.json").read_text())
    assert "errors" not in results, results["errors"]
    assert "failures" not in results, results["failures"]
    assert (tmp_path / "quick.md").read_text().startswith("# Bastion benchmark")

    tp = results["throughput"]
    for cipher in ("aes128-gcm", "default"):
        for direction in ("download", "upload", "both"):
            for path in PATHS:
                e = tp[cipher][direction][path]
                positive(e["mb_s"]["median"], f"throughput {cipher} {direction} {path}")
                positive(e["vs_openssh_jump"], f"ratio {cipher} {direction} {path}")
                positive(e["vs_openssh_nested"], f"nested ratio {cipher} {direction} {path}")

    login = results["login"]
    for path in LOGIN_PATHS:
        positive(login["paths"][path]["p50_ms"], f"login p50 {path}")
        positive(login["paths"][path]["p95_ms"], f"login p95 {path}")
        samples = login["paths"][path]["samples_ms"]
        assert len(samples) == results["meta"]["plan"]["logins"], path
    for path in ("bastion", "bastion_jump", "bastion_fresh"):
        # CPU is read in clock ticks (10 ms): a few fast logins may round to 0
        assert login["bastion_cpu_ms_per_login"][path] >= 0
    for path in ("openssh_jump", "openssh_nested"):
        assert login["jump_host_cpu_ms_per_login"][path] >= 0

    prop = results["route_propagation"]
    positive(prop["in_force_ms"]["p50"], "propagation p50")
    positive(prop["in_force_ms"]["p99"], "propagation p99")
    positive(prop["first_login_ms"]["p50"], "first login p50")
    positive(prop["logins_confirmed"], "logins confirmed")

    conc = results["concurrency"]
    idle = conc["idle"]["bastion"]
    assert idle["sessions"] == results["meta"]["plan"]["idle_sessions"]
    positive(idle["rss_mb"], "idle RSS")
    positive(conc["idle"]["openssh_jump"]["pss_mb"], "jump host PSS")
    for path in RATE_PATHS:
        positive(conc["login_rate"][path]["logins_per_s"], f"logins/s {path}")
        assert conc["login_rate"][path]["failed"] == 0

    check_scale(results)

    sig = results["signing"]
    for signer in ("vault", "local_ca"):
        positive(sig[signer]["wall_ms"]["p50"], f"signing {signer}")
        positive(sig["login"][signer]["p50_ms"], f"login via {signer}")

    cpu = results["cpu_per_gb"]
    for cipher in ("aes128-gcm", "default"):
        for direction in ("download", "upload", "both"):
            for path in ("bastion", "bastion_jump", "openssh_jump", "openssh_nested"):
                assert cpu[cipher][direction][path]["cpu_s_per_gb"]["median"] >= 0

    # without [server] workers in the bastion, the workers = 2 rows are "not available"
    workers = "bastion_fresh_w2" in results["scale"]["parallel_downloads"]["4"]
    unmeasured = {t["target"] for t in results["targets"] if t["value"] is None}
    assert len(results["targets"]) == 35
    assert all("workers = 2" in name for name in unmeasured), unmeasured
    assert not unmeasured or not workers, unmeasured

    assert set(results["plots"]) == set(CHARTS)
    markdown = (tmp_path / "quick.md").read_text()
    for chart in CHARTS:
        png = tmp_path / f"quick-{chart}.png"
        assert png.read_bytes().startswith(b"\x89PNG"), chart
        assert f"]({png.name})" in markdown, chart  # linked, relative


def check_scale(results: dict[str, Any]) -> None:
    scale = results["scale"]
    plan = results["meta"]["plan"]
    for streams in plan["parallel_counts"]:
        table = scale["parallel_downloads"][str(streams)]
        for path in ("openssh_direct", "openssh_jump", "openssh_nested", "bastion_fresh_w1"):
            positive(table[path]["mb_s"]["median"], f"{streams} downloads {path}")
        if "bastion_fresh_w2" in table:
            positive(table["w2_vs_w1"], f"{streams} downloads w2 vs w1")
        else:
            notes = scale["notes"]
            assert notes["bastion_fresh_w2"].startswith("not available"), notes
    logins = scale["logins"]
    assert logins["clients"] == 32
    for path in ("openssh_direct", "openssh_jump", "openssh_nested", "bastion_fresh_w1"):
        positive(logins[path]["logins_per_s"], f"fresh logins/s {path}")
        assert logins[path]["failed"] == 0, path
    points = scale["idle"]["points"]
    assert [p["sessions"] for p in points] == plan["idle_steps"]
    assert all(p["failed"] == 0 for p in points)
    for p in points:
        positive(p["rss_mb"], f"idle RSS at {p['sessions']}")
        # every session holds a process on host-102; sshd processes besides
        assert p["host_processes"] > p["sessions"]


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_ab_comparison_runs() -> None:
    """``python -m bench.ab`` (two bastions, alternating) still works; tiny sizes."""
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "bench.ab",
            "--b-tuning",
            "none",
            "--mib",
            "4",
            "--reps",
            "2",
            "--directions",
            "download,upload",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=170,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = re.findall(r"^(\w+) +(A|B|A -J|B -J) +(\d+) MB/s", proc.stdout, re.MULTILINE)
    assert {(d, n) for d, n, _ in rows} == {
        (d, n) for d in ("download", "upload") for n in ("A", "B", "A -J", "B -J")
    }, proc.stdout
    assert all(int(rate) > 0 for _, _, rate in rows), proc.stdout
