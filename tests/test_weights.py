"""Typed weights (``fcnseg.get_weights``) and the one preprocessing object every path uses."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

import fcnseg
from fcnseg.errors import FcnsegError
from fcnseg.record import PairedTransform


def test_builtin_weights_are_listed_and_typed():
    assert fcnseg.list_weights() == ["camvid", "siftflow"]
    w = fcnseg.get_weights("camvid")
    assert (w.name, w.arch, w.record.num_classes, w.path.name) == ("camvid", "fcn8s_efficientnet_lite0", 11,
                                                                  "camvid.safetensors")
    assert w.meta["split"] == "val" and w.meta["metrics"]["mean_iou"] == pytest.approx(0.7300, abs=1e-4)
    assert w.meta["checkpoint_chosen"].startswith("the epoch with the best dev mean IU")
    assert w.meta["command"].startswith("fcnseg train --config configs/camvid_fcn8s_efficientnet_lite0_cpu.yaml")
    assert w.meta["wall_time_s"] == pytest.approx(3986.4)


def test_the_camvid_weights_were_chosen_on_the_shipped_dev_split_and_scored_once_on_val():
    from fcnseg.data.dev import split_digests

    meta = fcnseg.get_weights("camvid").meta
    chosen = meta["selection"]
    assert meta["split"] == "val" and chosen["split"] == "dev" and chosen["epoch"] == 30
    assert chosen["lists_sha256"] == split_digests("camvid")  # the lists in this package chose it
    assert chosen["scores"]["mean_iou"] == pytest.approx(0.6526, abs=1e-4)
    assert meta["recipe"]["split"] == "fit" and meta["recipe"]["val_split"] == "dev"


def test_unknown_weights_name_the_builtin_ones():
    with pytest.raises(FcnsegError, match="built-in checkpoints: camvid, siftflow"):
        fcnseg.get_weights("camvidd")


def test_transforms_are_the_records_normalisation_at_original_size():
    w = fcnseg.get_weights("siftflow")
    t = w.transforms()
    assert isinstance(t, PairedTransform) and (t.mean, t.std) == (w.record.mean, w.record.std)
    image = Image.fromarray(np.arange(5 * 7 * 3, dtype=np.uint8).reshape(5, 7, 3))
    x, y = t(image, np.zeros((5, 7), np.uint8))
    expected = (torch.from_numpy(np.array(image)).permute(2, 0, 1).float() / 255
                - torch.tensor(w.record.mean).view(3, 1, 1)) / torch.tensor(w.record.std).view(3, 1, 1)
    assert x.shape == (3, 5, 7) and y.dtype == torch.int64
    assert torch.allclose(x, expected, atol=1e-6)
    # the inference path (a uint8 batch) gives the same numbers as the dataset path
    batch = torch.from_numpy(np.array(image)).permute(2, 0, 1)[None]
    assert torch.allclose(t.batch(batch)[0], x, atol=1e-6)


def test_segmenter_evaluation_and_service_use_the_weights_transforms():
    w = fcnseg.get_weights("camvid")
    seg = fcnseg.Segmenter(w)
    assert (seg.preprocess.mean, seg.preprocess.std) == (w.transforms().mean, w.transforms().std)
    image = np.random.default_rng(0).integers(0, 256, (45, 61, 3), dtype=np.uint8)
    assert np.array_equal(seg(image), fcnseg.Segmenter.from_checkpoint("camvid")(image))
    # the service and the CLI open their models through load_segmenter: the same preprocessing
    from fcnseg.cli.predict import load_segmenter

    served = load_segmenter("camvid")
    assert (served.preprocess.mean, served.preprocess.std) == (w.record.mean, w.record.std)
    # evaluation scores with the record's transforms
    from fcnseg.evaluation import checkpoint as ev

    class Data:  # what scoring sets up on the dataset: its transforms
        transforms = None

    data = Data()
    ev._open_for_scoring("camvid", data, "camvid", onnx=False, heads=None, backend=None, device="cpu",
                                       threads=None, dtype="float32", dense=None, dense_stride=None)
    assert (data.transforms.mean, data.transforms.std) == (w.transforms().mean, w.transforms().std)


def test_build_model_with_weights():
    w = fcnseg.get_weights("camvid")
    net = fcnseg.build_model("fcn8s_efficientnet_lite0", weights=w)
    ref = fcnseg.load_checkpoint("camvid")
    assert all(torch.equal(a, b) for a, b in zip(net.state_dict().values(), ref.state_dict().values()))
    assert not net.training and net.record.arch == w.arch
    with pytest.raises(FcnsegError, match="are for fcn8s_efficientnet_lite0, not fcn8s_resnet18"):
        fcnseg.build_model("fcn8s_resnet18", weights=w)


def test_meta_carries_the_training_cost_and_none_where_the_record_is_silent(tmp_path):
    camvid, siftflow = fcnseg.get_weights("camvid").meta, fcnseg.get_weights("siftflow").meta
    # camvid was trained after fcnseg train began to record the machine; siftflow before: None, not a guess
    assert camvid["cpu"] == "AMD EPYC, AVX2, 2 cores" and siftflow["cpu"] is None
    assert (camvid["wall_time_s"], camvid["train_images_per_second"], camvid["threads"]) == (3986.4, 2.87, 2)
    assert (siftflow["wall_time_s"], siftflow["train_images_per_second"]) == (6193.0, 6.25)
    from tiny_models import tiny_checkpoint

    path = tiny_checkpoint(tmp_path / "t.safetensors", provenance={
        "cpu": "Intel(R) Xeon(R) Platinum 8480+", "wall_time_s": 12.5, "config": {"threads": 4}})
    meta = fcnseg.get_weights(path).meta
    assert (meta["cpu"], meta["wall_time_s"], meta["threads"]) == ("Intel(R) Xeon(R) Platinum 8480+", 12.5, 4)
    assert meta["train_images_per_second"] is None and meta["split"] is None


def test_the_cpu_description_names_the_processor_its_capability_and_cores():
    import os

    from fcnseg.hardware import cpu_description

    name, capability, cores = cpu_description().rsplit(", ", 2)
    assert name and capability == torch.backends.cpu.get_cpu_capability()
    assert cores == f"{os.cpu_count()} cores"
