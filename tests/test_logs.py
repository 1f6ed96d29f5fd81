"""Logging in jobs: progress lines and warnings reach the rule's log file."""

import logging
import warnings

import pytest

from dinopipe.logs import Progress, logged


def test_progress_lines_count_rate_and_time_left(monkeypatch, caplog):
    clock = iter([100.0, 110.0, 150.0, 150.0])  # start, two updates, close
    monkeypatch.setattr("dinopipe.logs.time.monotonic", lambda: next(clock))
    caplog.set_level(logging.INFO, logger="dinopipe.progress")
    p = Progress(100, "train", "step", initial=20, interval_s=30)
    p.update(10)  # 10 s in: before the interval, no line
    assert caplog.messages == []
    p.set_postfix(loss="0.4100")
    p.update(30)  # 50 s in: 40 steps done since the start of this run -> 0.8 steps/s, 40 left -> 50 s
    assert caplog.messages == ["train: 60/100 steps (60 %), 0.8 steps/s, about 50 s left (loss 0.4100)"]
    p.close()
    p.close()  # once only
    assert len(caplog.messages) == 2 and caplog.messages[1].startswith("train: 60/100 steps (60 %)")


def test_progress_without_a_total_counts_only():
    p = Progress(None, "features v", "slice")
    p.update(12)
    assert p.line(p._start).startswith("features v: 12 slices")
    assert "%" not in p.line(p._start + 4) and "3 slices/s" in p.line(p._start + 4)


def test_logged_writes_progress_and_warnings_to_the_log(tmp_path):
    log = tmp_path / "logs" / "job.log"
    with logged(log):
        with Progress(4, "predict v.zarr", "block", interval_s=0) as p:
            p.update(2)
        warnings.warn("a warning from deep inside", UserWarning)
    text = log.read_text()
    assert "dinopipe.progress: predict v.zarr: 2/4 blocks (50 %)" in text
    assert "UserWarning: a warning from deep inside" in text
    with pytest.warns(UserWarning):  # outside the job, warnings are warnings again
        warnings.warn("after", UserWarning)
