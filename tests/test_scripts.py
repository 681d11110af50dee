"""Maintainer scripts under scripts/ that the docs rely on."""
from __future__ import annotations

import json

import pytest

from tiny_models import load_script


def test_plot_curves_script_joins_training_stages(tmp_path):
    script = load_script("scripts/plot_curves.py")
    runs = []
    for name, epochs in (("s1", 3), ("s2", 2)):
        run = tmp_path / name
        run.mkdir()
        rows = [{"epoch": e, "train_loss": 1.0 / e, "train_pixel_accuracy": 0.5,
                 **({"val": {"pixel_accuracy": 0.8, "mean_accuracy": 0.4, "mean_iou": 0.3}} if e % 2 == 0 else {})}
                for e in range(1, epochs + 1)]
        (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        runs.append(run)
    rows, starts = script.stage_history(runs)
    assert [r["epoch"] for r in rows] == [1, 2, 3, 4, 5] and starts == [4]
    assert rows[3]["train_loss"] == 1.0  # the second stage's first epoch, renumbered
    out = tmp_path / "curves.png"
    from fcnseg.train.report import plot_curves

    plot_curves(rows, out, stage_starts=starts)
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(SystemExit, match="metrics.jsonl: no such file"):
        script.stage_history([tmp_path / "nothing"])
