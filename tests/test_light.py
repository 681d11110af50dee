"""Light backbones: the shipped EfficientNet-Lite ImageNet weights load right, and the FCN uses them."""
import numpy as np
import pytest
import torch
from PIL import Image

import fcnseg
from fcnseg.record import IMAGENET_MEAN, IMAGENET_STD
from fcnseg.models.light import efficientnet_lite_classifier

skimage_data = pytest.importorskip("skimage.data")


def _center_crop_224(img: np.ndarray) -> torch.Tensor:
    im = Image.fromarray(img).convert("RGB")
    w, h = im.size
    s = 256 / min(w, h)
    im = im.resize((round(w * s), round(h * s)), Image.BILINEAR)
    w, h = im.size
    left, top = (w - 224) // 2, (h - 224) // 2
    x = torch.from_numpy(np.array(im.crop((left, top, left + 224, top + 224)))).permute(2, 0, 1).float() / 255
    return ((x - torch.tensor(IMAGENET_MEAN)[:, None, None]) / torch.tensor(IMAGENET_STD)[:, None, None])[None]


@pytest.fixture(scope="module")
def lite0():
    return efficientnet_lite_classifier(0, pretrained=True).eval()


@pytest.fixture(scope="module")
def categories():
    from torchvision.models import ResNet50_Weights

    return ResNet50_Weights.IMAGENET1K_V2.meta["categories"]


@pytest.mark.parametrize("photo, expected", [
    ("chelsea", {"tabby", "tiger cat", "Egyptian cat", "Persian cat", "Siamese cat"}),
    ("coffee", {"espresso", "cup", "coffee mug"}),
])
def test_imagenet_top1(lite0, categories, photo, expected):
    x = _center_crop_224(getattr(skimage_data, photo)())
    with torch.no_grad():
        top1 = categories[int(lite0(x).argmax())]
    assert top1 in expected


def test_fcn_backbone_carries_imagenet_weights(lite0):
    model = fcnseg.build_model("fcn8s_efficientnet_lite0", num_classes=11, pretrained=True)
    assert torch.equal(model.backbone.stem[0].weight, lite0.conv_stem.weight)
    assert torch.equal(model.backbone.stage32[-2].weight, lite0.conv_head.weight)
    # the stride-32 features are the classifier's pooled features before pooling
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        feats = model.eval().backbone(x)[32]
        ref = lite0.forward_features(x)
    torch.testing.assert_close(feats, ref)


@pytest.mark.parametrize("name", ["fcn8s_efficientnet_lite0", "fcn8s_resnet18"])
def test_light_geometry_and_offsets(name):
    model = fcnseg.build_model(name, num_classes=5)
    bb = model.backbone
    assert bb.strides == (8, 16, 32)
    for s, g in bb.geometry.items():
        assert g.scale == s and g.offset == 0  # symmetric 'same' padding: cell i sits on pixel s*i
    # 2x deconvolution (k=4, no padding) lands 1.5 cells early: floor to 1; final 8x lands 7.5 px early
    assert model.skip_offsets == [1, 1] and model.final_offset == 7
    x = torch.randn(2, 3, 45, 61)
    feats = bb(x)
    for s, f in feats.items():
        assert f.shape[1] == bb.channels[s]
        assert f.shape[-2:] == (-(-45 // s), -(-61 // s))
