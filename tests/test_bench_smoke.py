"""`make bench` works: every stage runs at toy sizes and reports its figures (timings are
benchmarks, not assertions; none is checked here)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
KEYS = {
    "raw": ("subscriber_msgs_per_s", "publisher_msgs_per_s", "backlog_drain_msgs_per_s"),
    "ingest": ("sqlite_1_persister", "sqlite_1_persister_parse_workers_0", "sqlite_2_persisters_parse_workers_0"),
    "e2e": ("steps", "max_sustained_stored_per_s", "at_max", "at_half"),
    "fleet": ("in_time_share", "latency_ms_p50", "latency_ms_p99", "peak_dispatch_per_s", "even_share_per_s"),
    "controller": ("cpu_s_per_60s_interval", "peak_rss_mb", "agents_asked_in_window"),
    "agent": ("rss_mb_max", "cpu_pct_of_core", "collection_ms"),
    "job": ("sizes",),
    "storage": ("sqlite", "mongodb", "sqlite_fleet"),
    "groups": ("cpu_s_per_60s_interval", "peak_rss_mb", "reload_ms", "busiest_second_after_reload_over_steady"),
    "metrics": ("scrape_plain", "scrape_gzip", "refresh_full", "refresh_steady", "series", "bytes_gzip"),
}


@pytest.mark.slow
@pytest.mark.parametrize("stage", list(KEYS))
def test_bench_stage_runs_at_toy_size_and_reports_its_figures(stage: str, tmp_path: Path) -> None:
    out = tmp_path / "results.json"
    done = subprocess.run([sys.executable, str(ROOT / "bench" / "run.py"), "--tiny", "--only", stage,
                           "--out", str(out), "--run-dir", str(tmp_path / "run")],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    results = json.loads(out.read_text())
    assert {"cores", "python", "mosquitto"} <= set(results["machine"])
    for key in KEYS[stage]:
        assert key in results[stage], f"{stage} lacks {key}: {results[stage]}"
    if stage == "ingest":  # each run against a raw run of its own, taken just before it
        assert results[stage]["sqlite_1_persister"]["ratio_to_raw_paired"] is not None
        assert "raw_subscriber_msgs_per_s_just_before" in results[stage]["sqlite_1_persister"]["runs"][0]
        assert results[stage]["sqlite_1_persister_parse_workers_0"]["parse_workers"] == 0
    if stage == "job":  # every simulated agent answered each job, and the figures are there
        fig = results[stage]["sizes"]["20"]
        assert fig["all_answered"] and {"send_s", "after_last_answer_s", "total_s", "peak_publish_per_s",
                                        "rss_growth_kb_per_agent"} <= set(fig)
    assert "results:" in done.stdout
