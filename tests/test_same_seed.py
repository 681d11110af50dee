"""benchmarks/same_seed.py: same-seed pairs of finished runs are checked to differ only in the speed settings, and
compared by hand-checkable numbers."""
import json
from pathlib import Path

import pytest

from fcnseg.config import TrainConfig, dump_config

from tiny_models import load_script


@pytest.fixture(scope="module")
def same_seed():
    return load_script("benchmarks/same_seed.py")


def make_run(path: Path, *, before: bool, finals: list[float], seconds: float, epochs: int = 2, seed: int = 3,
             lr: float = 2e-3, dtype: str = "float32", exact_batch_norm: bool = False, threads: int = 2) -> Path:
    """A run directory as fcnseg train leaves it: resolved config, one metrics row per epoch (validated at each),
    version.json with the amp decision."""
    path.mkdir(parents=True)
    cfg = TrainConfig(model="m", dataset="camvid", epochs=epochs, seed=seed, lr=lr, out=str(path),
                      amp=False if before else "auto", channels_last=not before, exact_batch_norm=exact_batch_norm,
                      threads=threads)
    (path / "config.yaml").write_text(dump_config(cfg))
    rows = [{"epoch": e + 1, "seconds": seconds, "images_per_s": 8 / seconds, "elapsed_s": seconds * (e + 1),
             "val": {"mean_iou": finals[e] / 100, "pixel_accuracy": 0.9}} for e in range(len(finals))]
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (path / "version.json").write_text(json.dumps({"amp": {"dtype": dtype}}))
    return path


def test_pairs_are_compared_with_speed_up_difference_and_interval(same_seed, tmp_path, capsys):
    b = make_run(tmp_path / "before3", before=True, finals=[60.0, 70.0], seconds=100.0)
    n = make_run(tmp_path / "now3", before=False, finals=[61.0, 69.6], seconds=50.0)
    assert same_seed.main([str(b), str(n), "--also", "70.76:70.23", "70.45:70.48"]) == 0
    out = capsys.readouterr().out
    assert "| before3 | 3 | NCHW | float32 | 100.0 | 0.08 | 200 | 60.00 / 70.00 | **70.00** | 90.00 |" in out
    assert "| now3 | 3 | channels-last | float32 | 50.0 |" in out
    # a "now" run with the exact batch norm pairs with the same "before", and its table row says so
    n2 = make_run(tmp_path / "now3x", before=False, finals=[61.0, 69.5], seconds=55.0, exact_batch_norm=True)
    assert same_seed.main([str(b), str(n2)]) == 0
    assert "| now3x | 3 | channels-last, exact batch norm | float32 | 55.0 |" in capsys.readouterr().out
    assert "| pair, seed 3 | | | | 2.00x | 2.00x | 2.00x | | **-0.40** | |" in out
    assert "3 pair(s), final val mIU now - before: -0.40, -0.53, +0.03; 2 of 3 within 0.5 points" in out
    # mean -0.30, sd 0.2934, t(0.975, 2) = 4.303: half-width 0.729
    assert "mean -0.30 points, 95% interval [-1.03, +0.43], standard deviation 0.29" in out


@pytest.mark.parametrize("change, message", [
    (dict(lr=1e-3), "differ in lr: a same-seed pair differs only in amp, amp_dtype, channels_last, exact_batch_norm"),
    (dict(seed=4), "differ in seed"),
    (dict(finals=[61.0]), "the run has not finished (1 of 2 epochs"),
])
def test_pairs_that_cannot_be_compared_are_refused_in_one_line(same_seed, tmp_path, capsys, change, message):
    b = make_run(tmp_path / "before", before=True, finals=[60.0, 70.0], seconds=100.0)
    n = make_run(tmp_path / "now", before=False, **{"finals": [61.0, 69.6], "seconds": 50.0, **change})
    assert same_seed.main([str(b), str(n)]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1


def test_a_before_run_must_be_the_old_loop_and_a_folder_a_run(same_seed, tmp_path, capsys):
    a = make_run(tmp_path / "a", before=False, finals=[60.0, 70.0], seconds=50.0)
    n = make_run(tmp_path / "n", before=False, finals=[61.0, 69.6], seconds=50.0)
    assert same_seed.main([str(a), str(n)]) == 2
    assert "a 'before' run trains with --no-amp --no-channels-last" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert same_seed.main([str(tmp_path / "empty"), str(n)]) == 2
    assert "no config.yaml (is this an fcnseg run directory?)" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        same_seed.main([str(a)])  # an odd number of directories
    with pytest.raises(SystemExit):
        same_seed.main([str(a), str(n), "--also", "70.1"])


def test_a_control_shows_the_old_loop_against_itself_apart_from_the_pairs(same_seed, tmp_path, capsys):
    b = make_run(tmp_path / "before3", before=True, finals=[60.0, 70.16], seconds=100.0)
    n = make_run(tmp_path / "now3", before=False, finals=[61.0, 69.62], seconds=50.0)
    b1 = make_run(tmp_path / "before3t1", before=True, finals=[59.0, 69.30], seconds=150.0, threads=1)
    assert same_seed.main([str(b), str(n), "--control", str(b), str(b1)]) == 0
    out = capsys.readouterr().out
    assert "1 pair(s), final val mIU now - before: -0.54; 0 of 1 within 0.5 points" in out
    assert "seed 3: before3 (2 threads) 70.16, before3t1 (1 thread) 69.30: -0.86 points" in out
    # a control is two old-loop runs that differ in threads only
    for other, message in ((n, "a 'before' run trains with --no-amp --no-channels-last"),
                           (make_run(tmp_path / "lr", before=True, finals=[1.0, 2.0], seconds=1.0, lr=1e-3),
                            "differ in lr: a control differs only in")):
        assert same_seed.main([str(b), str(n), "--control", str(b), str(other)]) == 2
        err = capsys.readouterr().err.strip()
        assert message in err and len(err.splitlines()) == 1
