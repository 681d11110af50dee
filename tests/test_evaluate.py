"""``fcnseg evaluate``: JSON schema, original resolution, class exclusions, plots and user errors."""
import json

import pytest

from fcnseg.cli import main

from tiny_models import make_folder_dataset, run_cli, write_launcher


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny model trained for one epoch on 3-class data whose images are 33 x 45 (odd sizes on purpose)."""
    tmp = tmp_path_factory.mktemp("eval")
    data = make_folder_dataset(tmp / "data", n_train=4, n_val=3, size=(33, 45))
    run = tmp / "run"
    assert main(["train", "--model", "tiny_fcn8s", "--dataset", "folder", "--root", str(data), "--epochs", "1",
                 "--batch-size", "2", "--crop-size", "32", "32", "--workers", "0", "--no-progress", "--no-plots",
                 "--out", str(run)]) == 0
    yield data, run, tmp


def _evaluate(data, checkpoint, *extra):
    return main(["evaluate", "--checkpoint", str(checkpoint), "--dataset", "folder", "--root", str(data),
                 "--split", "val", "--workers", "0", *extra])


@pytest.mark.slow  # moved out of the fast suite (issue 29: make test within 5 minutes); CI runs it
def test_json_schema_and_original_resolution(trained, capsys):
    data, run, tmp = trained
    out = tmp / "scores.json"
    png = tmp / "confusion.png"
    # a checkpoint file works as well as the run directory
    assert _evaluate(data, run / "checkpoints" / "last.safetensors", "--json", str(out),
                     "--confusion-png", str(png)) == 0
    table = capsys.readouterr().out
    assert "pixel accuracy" in table and "background" in table
    s = json.loads(out.read_text())
    assert len(s["per_class"]) == 3 and len(s["confusion_matrix"]) == 3
    # every score is the confusion matrix's (rows: ground truth; a class with no pixel either way has no IoU)
    cm = [[float(v) for v in row] for row in s["confusion_matrix"]]
    gt, pred = [sum(row) for row in cm], [sum(col) for col in zip(*cm)]
    assert s["pixel_accuracy"] == pytest.approx(sum(cm[i][i] for i in range(3)) / sum(gt))
    for i, c in enumerate(s["per_class"]):
        assert set(c) >= {"name", "iou", "accuracy", "gt_pixels", "pred_pixels"}
        assert (c["gt_pixels"], c["pred_pixels"]) == (gt[i], pred[i])
        union = gt[i] + pred[i] - cm[i][i]
        assert c["iou"] == (pytest.approx(cm[i][i] / union) if union else None)
    ious = [c["iou"] for c in s["per_class"] if c["iou"] is not None]
    assert s["mean_iou"] == pytest.approx(sum(ious) / len(ious))
    # every labelled pixel of the three 33x45 images (top row void) is scored: no resizing
    assert sum(c["gt_pixels"] for c in s["per_class"]) == 3 * 32 * 45
    assert sum(c["pred_pixels"] for c in s["per_class"]) == 3 * 32 * 45
    assert sum(map(sum, s["confusion_matrix"])) == 3 * 32 * 45
    assert png.is_file() and png.stat().st_size > 0


def test_exclusions(trained, tmp_path):
    data, run, _ = trained
    out = tmp_path / "s.json"
    assert _evaluate(data, run, "--exclude", "disc", "--json", str(out)) == 0
    s = json.loads(out.read_text())
    assert s["excluded"] == ["disc"] and [c["excluded"] for c in s["per_class"]] == [False, False, True]
    ious = [c["iou"] for c in s["per_class"][:2] if c["iou"] is not None]
    assert s["mean_iou"] == pytest.approx(sum(ious) / len(ious))
    assert _evaluate(data, run, "--exclude-absent", "--limit", "1", "--json", str(out)) == 0
    s = json.loads(out.read_text())
    assert s["images"] == 1
    assert s["excluded"] == [c["name"] for c in s["per_class"] if c["gt_pixels"] == 0]


def test_user_errors(trained, tmp_path, capsys):
    data, run, _ = trained
    assert _evaluate(data, run, "--exclude", "unicorn") == 1
    assert "not a class" in capsys.readouterr().err
    assert _evaluate(data, tmp_path / "nothing-here") == 1
    assert "no such checkpoint" in capsys.readouterr().err
    other = make_folder_dataset(tmp_path / "two", n_train=1, n_val=1)
    (other / "classes.txt").write_text("background\nsquare\ndisc\nsky\n")
    assert _evaluate(other, run) == 1
    assert "predicts 3 classes" in capsys.readouterr().err


def test_test_time_augmentation_is_scored_and_recorded(trained, tmp_path):
    data, run, _ = trained
    plain, aug = tmp_path / "plain.json", tmp_path / "aug.json"
    assert _evaluate(data, run, "--json", str(plain)) == 0
    assert _evaluate(data, run, "--flip", "--scales", "0.75", "1", "--json", str(aug)) == 0
    p, a = json.loads(plain.read_text()), json.loads(aug.read_text())
    assert p["tta"] == {"flip": False, "scales": [1.0]} and a["tta"] == {"flip": True, "scales": [0.75, 1.0]}
    assert sum(map(sum, a["confusion_matrix"])) == sum(map(sum, p["confusion_matrix"]))  # same pixels scored
    assert _evaluate(data, run, "--scales", "0") == 1


@pytest.mark.slow  # moved out of the fast suite (issue 29: make test within 5 minutes); CI runs it
def test_an_exported_onnx_model_scores_like_its_checkpoint(trained, tmp_path):
    pytest.importorskip("onnxruntime")
    data, run, _ = trained
    onnx_path = tmp_path / "m.onnx"
    assert main(["export", "--checkpoint", str(run), "--format", "onnx", "--out", str(onnx_path),
                 "--size", "33", "45"]) == 0
    scores = []
    for ckpt in (run, onnx_path):
        out = tmp_path / f"{ckpt.name}.json"
        assert _evaluate(data, ckpt, "--json", str(out), "--flip") == 0
        scores.append(json.loads(out.read_text()))
    a, b = scores
    # the same pixels scored the same way, up to the odd float32 tie
    moved = sum(abs(x - y) for ra, rb in zip(a["confusion_matrix"], b["confusion_matrix"]) for x, y in zip(ra, rb))
    assert moved <= 0.005 * 3 * 32 * 45 and b["checkpoint"].endswith("m.onnx")
    assert b["tta"] == {"flip": True, "scales": [1.0]}
    assert _evaluate(data, onnx_path, "--amp") == 1  # ONNX Runtime runs the float32 graph only: refused


@pytest.mark.slow  # moved out of the fast suite (issue 29: make test within 5 minutes); CI runs it
@pytest.mark.openvino
def test_openvino_scores_in_bf16_inference_precision(trained, tmp_path, capsys):
    """``--backend openvino --dtype bfloat16`` scores the exported file in OpenVINO's bf16 inference precision
    (the fast path on CPUs with bf16 units), so its mean IU can be compared with float32's before it is used."""
    data, run, _ = trained
    onnx_path = tmp_path / "m.onnx"
    assert main(["export", "--checkpoint", str(run), "--format", "onnx", "--out", str(onnx_path),
                 "--size", "33", "45"]) == 0
    scores = {}
    for flags in ((), ("--dtype", "bfloat16")):
        out = tmp_path / f"ov{len(flags)}.json"
        proc = run_cli(write_launcher(tmp_path), "evaluate", "--checkpoint", str(onnx_path), "--dataset", "folder",
                       "--root", str(data), "--split", "val", "--workers", "0", "--backend", "openvino", *flags,
                       "--json", str(out), timeout=300)  # OpenVINO bf16 compiles in a child (see run_python)
        assert proc.returncode == 0, proc.stderr
        scores[flags and "bf16" or "f32"] = json.loads(out.read_text())
    a, b = scores["f32"]["confusion_matrix"], scores["bf16"]["confusion_matrix"]
    assert sum(map(sum, a)) == sum(map(sum, b))  # the same pixels, scored in either precision
    moved = sum(abs(x - y) for ra, rb in zip(a, b) for x, y in zip(ra, rb))
    assert moved <= 0.05 * sum(map(sum, a)), moved


# -- evaluation at inference speed: the batched, optimized path scores exactly like the per-image one --

def _per_image_matrix(model, dataset, num_classes):
    """The reference: the model as loaded, one image at a time, plain argmax."""
    import torch

    from fcnseg.evaluation.metrics import ConfusionMatrix

    cm = ConfusionMatrix(num_classes, ignore_index=dataset.ignore_index if hasattr(dataset, "ignore_index") else 255)
    with torch.no_grad():
        for i in range(len(dataset)):
            image, mask = dataset[i][:2]
            cm.update(target=mask[None], pred=model(image[None]).argmax(1))
    return cm.mat


def test_batched_optimized_evaluation_equals_per_image(trained, capsys):
    import torch

    from fcnseg.weights.checkpoint import load_checkpoint
    from fcnseg.data import build_dataset
    from fcnseg.evaluation.loop import evaluate_model

    data, run, tmp = trained
    model = load_checkpoint(run)
    dataset = build_dataset("folder", data, "val")
    want = _per_image_matrix(model, dataset, 3)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    got = evaluate_model(model, dataset, batch_size=2, workers=0)
    assert torch.equal(got.mat, want) and int(want.sum()) == 3 * 32 * 45
    assert all(torch.equal(v, before[k]) and v.is_contiguous() for k, v in model.state_dict().items())
    # the command: any batch size gives the same matrix; a batch size below 1 is a user error
    mats = []
    for bs in ("1", "3"):
        out = tmp / f"bs{bs}.json"
        assert _evaluate(data, run, "--batch-size", bs, "--json", str(out)) == 0
        mats.append(json.loads(out.read_text())["confusion_matrix"])
    assert mats[0] == mats[1] == want.tolist()
    assert _evaluate(data, run, "--batch-size", "0") == 1
    assert "batch size must be at least 1" in capsys.readouterr().err


@pytest.mark.slow  # moved out of the fast suite (issue 29: make test within 5 minutes); CI runs it
def test_mixed_sizes_and_batch_norm_fold_score_exactly(tmp_path):
    """Images of two sizes in one loader batch, a real network whose batch norms are folded, a worker
    process: the confusion matrix is still exactly the per-image one (float32)."""
    import torch
    import torch.nn as nn

    import fcnseg
    from fcnseg.evaluation.loop import evaluate_model

    torch.manual_seed(0)
    model = fcnseg.build_model("fcn8s_efficientnet_lite0", num_classes=4, pretrained=True).eval()
    for conv in [model.score_fr, *model.score_skip.values()]:
        nn.init.normal_(conv.weight, std=conv.in_channels ** -0.5)  # fresh score layers output zeros
    g = torch.Generator().manual_seed(1)
    dataset = []
    for h, w in [(33, 45), (40, 30), (33, 45), (33, 45), (40, 30)]:
        mask = torch.randint(0, 4, (h, w), generator=g)
        mask[0] = 255
        dataset.append((torch.randn(3, h, w, generator=g), mask))
    want = _per_image_matrix(model, dataset, 4)
    got = evaluate_model(model, dataset, batch_size=4, workers=1)
    assert torch.equal(got.mat, want)
    assert any(isinstance(m, nn.BatchNorm2d) for m in model.modules())  # the caller's model was left alone


def test_validation_in_training_scores_as_evaluate_does(trained, tmp_path):
    """The run's validation goes through the evaluate path: its scores after the last epoch are exactly
    those of ``fcnseg evaluate`` on the checkpoint that epoch saved."""
    data, run, _ = trained
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    val = rows[-1]["val"]
    out = tmp_path / "s.json"
    assert _evaluate(data, run / "checkpoints" / "last.safetensors", "--json", str(out)) == 0
    s = json.loads(out.read_text())
    for key in ("pixel_accuracy", "mean_iou", "fw_iou", "num_pixels"):
        assert val[key] == s[key], key


def test_scoring_in_worker_processes_counts_exactly(one_thread, monkeypatch):
    """Where the workers cover the CPU threads, each worker loads and scores its own batches: the matrix is
    still exactly the per-image one, with images of two sizes and a partial last batch."""
    import torch
    import torch.nn as nn

    import fcnseg
    import fcnseg.evaluation.loop as evaluation

    torch.manual_seed(0)
    model = fcnseg.build_model("fcn8s_efficientnet_lite0", num_classes=4, pretrained=True).eval()
    for conv in [model.score_fr, *model.score_skip.values()]:
        nn.init.normal_(conv.weight, std=conv.in_channels ** -0.5)
    g = torch.Generator().manual_seed(2)
    dataset = []
    for h, w in [(33, 45), (40, 30), (33, 45), (33, 45), (40, 30), (33, 45), (33, 45)]:
        mask = torch.randint(0, 4, (h, w), generator=g)
        mask[0] = 255
        dataset.append((torch.randn(3, h, w, generator=g), mask))
    want = _per_image_matrix(model, dataset, 4)
    taken = []
    real = evaluation._score_in_workers
    monkeypatch.setattr(evaluation, "_score_in_workers", lambda *a, **k: taken.append(1) or real(*a, **k))
    got = evaluation.evaluate_model(model, dataset, batch_size=3, workers=2)
    assert taken and torch.equal(got.mat, want)
    taken.clear()
    assert torch.equal(evaluation.evaluate_model(model, dataset, batch_size=3, workers=0).mat, want) and not taken


def test_validation_scores_in_float32_when_training_in_bf16(tmp_path, monkeypatch):
    """A run trained with bf16 autocast is still validated in float32: the mean IU that picks the best checkpoint
    is the one ``fcnseg evaluate`` reports for the saved file by default, not the bf16 one."""
    import fcnseg.evaluation.loop

    data = make_folder_dataset(tmp_path / "data", n_train=4, n_val=3, size=(33, 45))
    real, dtypes = fcnseg.evaluation.loop.evaluate_model, []

    def spy(*args, **kwargs):
        dtypes.append(kwargs.get("dtype"))
        return real(*args, **kwargs)

    monkeypatch.setattr(fcnseg.evaluation.loop, "evaluate_model", spy)
    run = tmp_path / "run"
    assert main(["train", "--model", "tiny_fcn8s", "--dataset", "folder", "--root", str(data), "--epochs", "1",
                 "--batch-size", "2", "--crop-size", "32", "32", "--workers", "0", "--no-progress", "--no-plots",
                 "--amp", "--out", str(run)]) == 0
    assert json.loads((run / "version.json").read_text())["amp"]["dtype"] == "bfloat16"  # it did train in bf16
    assert dtypes == [None]  # one validation, in float32
    out = tmp_path / "s.json"
    assert _evaluate(data, run / "checkpoints" / "last.safetensors", "--json", str(out)) == 0
    val = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()][-1]["val"]
    assert val["mean_iou"] == json.loads(out.read_text())["mean_iou"]
