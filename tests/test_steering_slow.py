"""Slow: the story workload on its defaults (`codebook-features stories`, about 6 minutes on 2
CPU cores) and the claim the README makes of it: forcing a topic's codes on raises every
topic's mention rate far above its unsteered baseline. Run with `make test-slow`."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from codebook_features.experiments.stories.job import StoryDemoConfig

MIN_RATIO = 3.0
"""Steered mention rate at least this many times the baseline (measured: 4 to 15 times)."""
MIN_GAIN = 0.30
"""And at least this many points above it (measured: +44 to +64 points)."""


@pytest.mark.slow
def test_topic_steering_raises_every_topic_mention_rate(tmp_path):
    out = tmp_path / "stories"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    res = subprocess.run([sys.executable, "-m", "codebook_features", "stories", "--out",
                          str(out)], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=3 * 3600)
    assert res.returncode == 0, res.stderr[-3000:]
    report = json.loads((out / "report.json").read_text())
    cfg = StoryDemoConfig()
    assert report["config"]["num_stories"] == cfg.num_stories  # the defaults ran
    rows = {r["topic"]: r for r in report["steering"]}
    assert list(rows) == list(cfg.topics)
    table = "\n".join(f"{t}: baseline {100 * r['baseline']:.1f}%, steered "
                      f"{100 * r['steered']:.1f}%" for t, r in rows.items())
    print(table)
    for topic, r in rows.items():
        assert r["samples"] == 4 * cfg.samples_per_prompt, topic
        assert r["codes"] == cfg.codes_per_topic, topic
        assert r["steered"] >= MIN_RATIO * r["baseline"], f"{topic}: too little\n{table}"
        assert r["steered"] - r["baseline"] >= MIN_GAIN, f"{topic}: too little\n{table}"
    # The figures the command prints are report.json's.
    lines = res.stdout.splitlines()
    printed = json.loads("\n".join(lines[len(lines) - lines[::-1].index("{") - 1:]))
    assert printed["steering"] == report["steering"]
