"""Training on damaged data with --skip-bad: bad samples and listing problems are left out before training,
each named once in the log, counted in metrics.jsonl and the summary; no sample stands in for another."""
import json
import logging
from collections import Counter

import pytest

from fcnseg.config import from_dict
from fcnseg.data import build_dataset
from fcnseg.errors import FcnsegError

from tiny_models import BAD_FILES, LISTING, lines_naming, make_damaged_dataset, make_folder_dataset

GOOD = [f"img{i:03d}" for i in range(10) if i not in (1, 2)]


def _cfg(root, out, **over):
    values = {"model": "tiny_fcn8s", "dataset": "folder", "root": str(root), "split": "all", "val_split": None,
              "epochs": 2, "batch_size": 2, "crop_size": [32, 32], "workers": 0, "threads": 1, "lr": 0.01,
              "progress": False, "plots": False, "out": str(out), "skip_bad": True}
    return from_dict({**values, **over})


@pytest.fixture(scope="module")
def damaged(tmp_path_factory):
    return make_damaged_dataset(tmp_path_factory.mktemp("damaged"))


def test_listing_problems_say_what_is_wrong(damaged):
    ds = build_dataset("folder", damaged, "all", skip_bad=True)
    assert sorted(ds.names) == sorted([f"img{i:03d}" for i in range(10)])  # the damaged pairs are listed
    assert len(ds.problems) == len(LISTING)
    for name, phrase in LISTING.items():
        hits = [p for p in ds.problems if p.split(": ", 1)[0].endswith("/" + name)]
        assert len(hits) == 1 and phrase in hits[0], (name, ds.problems)
    with pytest.raises(FcnsegError, match=r"\(and 3 more problems\).*--skip-bad"):
        build_dataset("folder", damaged, "all")


def test_fit_leaves_bad_samples_out_counts_and_names_each_once(tiny, damaged, tmp_path, caplog, monkeypatch):
    from fcnseg.data.base import SegmentationDataset
    from fcnseg.train import fit

    seen = []
    fetch = SegmentationDataset.fetch

    def spy(self, index):
        seen.append(self.files[index][0].stem)
        return fetch(self, index)

    monkeypatch.setattr(SegmentationDataset, "fetch", spy)
    caplog.set_level(logging.INFO, logger="fcnseg")
    summary = fit(_cfg(damaged, tmp_path / "run"))

    # every good sample once per epoch, no bad one, nothing standing in for another
    assert Counter(seen) == {name: 2 for name in GOOD}
    assert summary["skipped_samples"] == 2 and summary["listing_problems"] == 4 and summary["filled_slots"] == 0
    assert summary["epoch"] == 2 and summary["step"] == 2 * 4
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 2
    assert all(r["skipped_samples"] == 2 and r["listing_problems"] == 4 and r["filled_slots"] == 0 for r in rows)
    for name, phrase in {**BAD_FILES, **LISTING}.items():
        lines = lines_naming(caplog.text, name)
        assert len(lines) == 1 and phrase in lines[0], (name, lines)  # once per run, not once per epoch
    warned = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warned) == 6
    assert "training on 8 of 10 samples" in caplog.text
    assert "left out 2 bad samples and 4 listing problems" in caplog.text  # the end-of-training line


def test_cli_flag_metrics_and_stderr(tiny, damaged, tmp_path, capsys):
    from fcnseg.cli import main

    base = ["train", "--model", "tiny_fcn8s", "--dataset", "folder", "--root", str(damaged), "--split", "all",
            "--val-split", "none", "--epochs", "1", "--batch-size", "4", "--crop-size", "32", "32", "--workers", "0",
            "--no-progress", "--no-plots"]
    assert main([*base, "--out", str(tmp_path / "strict")]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--skip-bad" in err and "skip_bad=True" in err  # one line, the flag named
    assert not (tmp_path / "strict").exists()

    assert main([*base, "--skip-bad", "--out", str(tmp_path / "run")]) == 0
    err = capsys.readouterr().err
    for name in {**BAD_FILES, **LISTING}:
        lines = lines_naming(err, name)
        assert len(lines) == 1 and lines[0].startswith("fcnseg: warning: "), (name, lines)
    row = json.loads((tmp_path / "run" / "metrics.jsonl").read_text())
    assert (row["skipped_samples"], row["listing_problems"], row["step"]) == (2, 4, 2)
    # a resumed run checks again and counts the same samples, not twice as many
    assert main(["train", "--resume", str(tmp_path / "run"), "--epochs", "2", "--no-progress"]) == 0
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [(r["epoch"], r["step"], r["skipped_samples"], r["listing_problems"]) for r in rows] == \
        [(1, 2, 2, 4), (2, 4, 2, 4)]


def test_without_skip_bad_a_bad_file_stops_the_run_naming_it_and_the_flag(tiny, tmp_path, capsys):
    from fcnseg.cli import main

    root = make_folder_dataset(tmp_path / "data", n_train=4, n_val=1)
    data = (root / "images" / "img002.png").read_bytes()
    (root / "images" / "img002.png").write_bytes(data[: len(data) // 2])
    assert main(["train", "--model", "tiny_fcn8s", "--dataset", "folder", "--root", str(root), "--epochs", "1",
                 "--batch-size", "2", "--crop-size", "32", "32", "--workers", "0", "--no-progress", "--no-plots",
                 "--out", str(tmp_path / "run")]) == 1
    last = capsys.readouterr().err.splitlines()[-1]
    assert last.startswith("fcnseg: error: ") and "img002.png: truncated image" in last and "--skip-bad" in last


def test_a_sample_that_goes_bad_after_the_check_is_counted_and_named_once(tiny, damaged, tmp_path, caplog,
                                                                           monkeypatch):
    """The start-up check passed everything (as if img001 and img002 broke later): each of their slots is
    filled by the next sample, counted per slot, and each file is named once in the run."""
    from fcnseg.train import fit, setup

    monkeypatch.setattr(setup, "scan_samples", lambda ds, workers=0: (list(range(len(ds))), []))
    caplog.set_level(logging.INFO, logger="fcnseg")
    summary = fit(_cfg(damaged, tmp_path / "run", epochs=3))
    assert summary["filled_slots"] == 3 * 2  # two bad slots in each of the three epochs
    assert summary["skipped_samples"] == 2 and summary["listing_problems"] == 4
    for name in BAD_FILES:
        lines = lines_naming(caplog.text, name)
        assert len(lines) == 1 and "changed during the run" in lines[0], (name, lines)
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["filled_slots"] for r in rows] == [2, 4, 6]


def test_skip_bad_belongs_to_its_own_setting(tiny, damaged, tmp_path):
    from fcnseg.train import fit

    cfg = _cfg(damaged, tmp_path / "run", skip_bad=False, dataset_kwargs={"skip_bad": True})
    with pytest.raises(FcnsegError, match="--skip-bad"):
        fit(cfg)
