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


def test_the_ray_benchmark_gives_predict_as_many_distinct_images_as_it_times(tmp_path):
    """benchmarks/ray_predict.py repeats the frames it has to reach --images; predict takes a file once however
    many symlinks lead to it, so repeats must be files of their own or the images/s counts images never segmented
    (a run once timed 468 of 2,000)."""
    from PIL import Image

    from fcnseg.cli.predict import expand_inputs

    bench = load_script("benchmarks/ray_predict.py")
    source = tmp_path / "frames"
    source.mkdir()
    for i in range(2):
        Image.new("RGB", (8, 6), (i * 100, 0, 0)).save(source / f"f{i}.png")
    made = bench.images(str(source), 5, tmp_path / "in")
    files, problems = expand_inputs([str(tmp_path / "in")])
    assert len(made) == 5 and len(files) == 5 and not problems
    assert (tmp_path / "in" / "frame000004.png").read_bytes() == (source / "f0.png").read_bytes()


def test_the_release_script_records_the_dev_selection_and_refuses_to_report_dev():
    from fcnseg.data.dev import split_digests

    release = load_script("scripts/release_model.py")
    prov = {"config": {"dataset": "camvid", "val_split": "dev"}}
    record = {"metrics": {"split": "dev", "epoch": 30, "mean_iou": 0.7, "pixel_accuracy": 0.9}}
    chosen = release.selected_on(record, prov)
    assert chosen["split"] == "dev" and chosen["epoch"] == 30 and chosen["lists_sha256"] == split_digests("camvid")
    assert chosen["scores"] == {"mean_iou": 0.7, "pixel_accuracy": 0.9}
    # a run that validated on val chose nothing on dev: no selection is claimed for it
    assert release.selected_on({"metrics": {"split": "val"}}, {"config": {"val_split": "val"}}) is None
