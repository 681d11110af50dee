"""Library calls that need eval mode leave the caller's model in the modes it had, submodule by submodule."""
from __future__ import annotations

import pytest
import torch

from fcnseg.weights.export import export_onnx, export_torchscript
from fcnseg.modes import eval_mode, train_mode
from fcnseg.evaluation.loop import evaluate
from tiny_models import tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")


def _training_with_a_frozen_layer():
    model = tiny_model().train()
    frozen = next(m for m in model.modules() if isinstance(m, torch.nn.Conv2d))
    frozen.eval()  # as a caller freezing a BatchNorm would
    return model, frozen


def _modes(model):
    return [m.training for m in model.modules()]


def test_eval_mode_restores_each_submodule_also_on_error():
    model, frozen = _training_with_a_frozen_layer()
    before = _modes(model)
    with eval_mode(model):
        assert not any(_modes(model))
    assert _modes(model) == before and not frozen.training
    with pytest.raises(RuntimeError), eval_mode(model):
        raise RuntimeError("inside")
    assert _modes(model) == before
    model.eval()
    with train_mode(model):
        assert all(_modes(model))
    assert not any(_modes(model))


@pytest.mark.slow  # moved out of the fast suite (issue 29: make test within 5 minutes); CI runs it
def test_exports_leave_the_callers_model_as_it_was(tmp_path):
    model, frozen = _training_with_a_frozen_layer()
    before = _modes(model)
    export_torchscript(model, tmp_path / "m.pt", example_size=(32, 32))
    assert _modes(model) == before
    export_onnx(model, tmp_path / "m.onnx", example_size=(32, 32))
    assert _modes(model) == before and not frozen.training


def test_evaluate_leaves_the_callers_model_as_it_was():
    model, frozen = _training_with_a_frozen_layer()
    before = _modes(model)
    batches = [(torch.rand(2, 3, 32, 32), torch.randint(0, 5, (2, 32, 32)))]
    cm = evaluate(model, batches, 5, device=torch.device("cpu"), progress=False)
    assert int(cm.mat.sum()) == 2 * 32 * 32
    assert _modes(model) == before and not frozen.training
