"""Configs: every shipped YAML loads into the typed TrainConfig; precedence defaults < YAML < flags."""
from pathlib import Path

import pytest

from fcnseg.cli import build_parser
from fcnseg.cli.train import resolve_config
from fcnseg.config import TrainConfig, dump_config, from_dict, load_config
from fcnseg.errors import FcnsegError

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))


def test_configs_are_shipped():
    names = {p.stem for p in CONFIGS}
    assert {"voc_fcn32s_vgg16", "voc_fcn16s_vgg16", "voc_fcn8s_vgg16", "voc_fcn8s_atonce_vgg16",
            "siftflow_fcn16s_vgg16", "camvid_fcn8s_vgg16_adam_seed", "camvid_fcn8s_efficientnet_lite0_cpu",
            "camvid_fcn8s_resnet18_cpu", "siftflow_fcn8s_efficientnet_lite2_cpu"} <= names


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_shipped_config_loads(path):
    import yaml

    cfg = load_config(path).validate()
    assert isinstance(cfg, TrainConfig)
    keys = set(yaml.safe_load(path.read_text()))
    assert keys <= set(cfg.to_dict())
    assert isinstance(cfg.lr, float) and cfg.lr > 0
    # the resolved config round-trips through YAML unchanged
    assert from_dict(yaml.safe_load(dump_config(cfg))) == cfg


def test_paper_recipe_values():
    cfg = load_config(next(p for p in CONFIGS if p.stem == "voc_fcn32s_vgg16"))
    assert (cfg.optimizer, cfg.lr, cfg.momentum, cfg.loss_reduction) == ("sgd", 1e-10, 0.99, "sum")
    assert (cfg.bias_lr_mult, cfg.bias_decay, cfg.batch_size) == (2.0, False, 1)


def test_unknown_key_suggests_close_names(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("batch_sise: 4\n")
    with pytest.raises(FcnsegError, match="did you mean batch_size"):
        load_config(p)
    p.write_text("learning_rate: 0.1\n")
    with pytest.raises(FcnsegError, match="valid keys"):
        load_config(p)


def test_types_are_checked_and_coerced(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("lr: 1e-10\nepochs: 3\ncrop_size: [64, 96]\namp: yes\nclass_weights: median\n")
    cfg = load_config(p)
    assert cfg.lr == 1e-10 and cfg.epochs == 3 and cfg.crop_size == [64, 96] and cfg.amp is True
    assert cfg.class_weights == "median"
    with pytest.raises(FcnsegError, match="epochs"):
        from_dict({"epochs": "many"})
    with pytest.raises(FcnsegError, match="optimizer"):
        from_dict({"optimizer": "rmsprop"}).validate()
    with pytest.raises(FcnsegError, match="loss_sample"):
        from_dict({"loss_sample": 0.0}).validate()


def test_flags_override_yaml_which_overrides_defaults(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("model: fcn8s_resnet18\nlr: 0.5\nepochs: 7\nroot: /data\n")
    args = build_parser().parse_args(["train", "--config", str(p), "--lr", "0.01", "--amp",
                                      "--set", "bias_lr_mult=2", "--val-split", "none"])
    cfg = resolve_config(args)
    assert cfg.model == "fcn8s_resnet18" and cfg.epochs == 7  # from YAML
    assert cfg.lr == 0.01 and cfg.amp is True and cfg.bias_lr_mult == 2.0 and cfg.val_split is None  # flags
    assert cfg.batch_size == TrainConfig().batch_size  # default


def test_resume_reads_the_runs_config(tmp_path):
    from fcnseg.config import save_config

    save_config(from_dict({"model": "fcn8s_resnet18", "epochs": 4, "root": "/data", "out": "elsewhere"}),
                tmp_path / "config.yaml")
    cfg = resolve_config(build_parser().parse_args(["train", "--resume", str(tmp_path), "--epochs", "6"]))
    assert cfg.model == "fcn8s_resnet18" and cfg.epochs == 6 and cfg.out == str(tmp_path)
    with pytest.raises(FcnsegError, match="config.yaml"):
        resolve_config(build_parser().parse_args(["train", "--resume", str(tmp_path / "nope")]))


def test_cli_choices_are_exactly_what_the_config_accepts():
    """The train flags with choices offer what TrainConfig validates, no more and no less (read back from
    the config's own refusal message, so the two cannot drift apart unnoticed)."""
    from fcnseg.cli.train import FLAGS

    with_choices = {key: kw["choices"] for key, kw in FLAGS.values() if "choices" in kw}
    assert set(with_choices) == {"optimizer", "schedule", "loss_reduction", "on_nonfinite", "amp_dtype"}
    for key, choices in with_choices.items():
        for value in choices:
            assert getattr(from_dict({key: value}).validate(), key) == value
        with pytest.raises(FcnsegError, match=f"{key} must be one of") as err:
            from_dict({key: "nonsense"}).validate()
        valid = str(err.value).split("must be one of ", 1)[1].split(";")[0].split(", ")
        assert sorted(valid) == sorted(choices), key
