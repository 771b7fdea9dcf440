"""The FID Inception-v3 (pure torch): key layout and size of pytorch-fid's weights file, the FID graph's pooling
patches, and loading rules (safetensors; pickle only when allowed, weights_only).  The real weights file is not
on this machine, so the network is exercised with random weights saved in the expected layout."""

import pytest
import torch
from safetensors.torch import save_file

from steerdiff.metrics.fd import InceptionFID
from steerdiff.metrics.inception import FIDInceptionV3, InceptionA, inception_features, load_fid_inception


def test_parameter_count_and_key_layout_match_torchvision_inception3():
    model = FIDInceptionV3()
    # torchvision documents 27,161,264 parameters for Inception3 (1000 classes, aux head).  pytorch-fid's FID
    # network drops the aux head (conv0 98,560 + conv1 2,459,136 + fc 769,000 = 3,326,696) and has 1008 classes
    # (+8 x 2048 + 8 = 16,392): 27,161,264 - 3,326,696 + 16,392 = 23,850,960.
    assert sum(p.numel() for p in model.parameters()) == 23_850_960
    state = model.state_dict()
    # 94 conv-bn units x (conv.weight, bn.weight, bn.bias, bn.running_mean, bn.running_var, num_batches_tracked)
    assert len(state) == 94 * 6 + 2
    shapes = {
        "Conv2d_1a_3x3.conv.weight": (32, 3, 3, 3),
        "Conv2d_4a_3x3.bn.running_var": (192,),
        "Mixed_5b.branch_pool.conv.weight": (32, 192, 1, 1),
        "Mixed_6a.branch3x3.conv.weight": (384, 288, 3, 3),
        "Mixed_6e.branch7x7dbl_5.conv.weight": (192, 192, 1, 7),
        "Mixed_7a.branch7x7x3_4.conv.weight": (192, 192, 3, 3),
        "Mixed_7c.branch3x3dbl_3b.bn.running_var": (384,),
        "Mixed_7c.branch_pool.conv.weight": (192, 2048, 1, 1),
        "fc.weight": (1008, 2048),
    }
    for key, shape in shapes.items():
        assert tuple(state[key].shape) == shape, key
    assert not any(k.startswith("AuxLogits") for k in state)


def test_average_pools_ignore_padding_like_tensorflow():
    block = InceptionA(4, pool_features=2).eval()
    for p in block.branch_pool.parameters():
        torch.nn.init.constant_(p, 1.0)
    x = torch.ones(1, 4, 5, 5)
    pooled = block(x)[:, -2:]  # the pool branch: a constant input stays constant, borders included
    assert torch.allclose(pooled, pooled[:, :, 2:3, 2:3].expand_as(pooled))


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    torch.manual_seed(0)
    model = FIDInceptionV3()
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.1, 0.1)
            m.running_var.uniform_(0.5, 1.5)
    state = {k: v for k, v in model.state_dict().items() if not k.endswith("num_batches_tracked")}
    folder = tmp_path_factory.mktemp("inception")
    save_file(state, str(folder / "fid_inception.safetensors"))
    torch.save(state, folder / "pt_inception.pth")
    return folder, model


def test_loads_safetensors_and_gives_pool3_features(weights):
    folder, reference = weights
    model = load_fid_inception(folder / "fid_inception.safetensors")
    images = torch.rand(1, 1, 8, 8) * 2 - 1
    features = inception_features(images, model)
    assert features.shape == (1, 2048) and features.dtype == torch.float64 and torch.isfinite(features).all()
    x = torch.nn.functional.interpolate(
        (torch.round((images + 1) * 127.5) / 255).expand(-1, 3, -1, -1), size=(299, 299), mode="bilinear", align_corners=False)
    with torch.no_grad():
        assert torch.allclose(features, reference.eval()(2 * x - 1).double(), atol=1e-5)


def test_pickle_needs_explicit_opt_in(weights):
    folder, _ = weights
    with pytest.raises(ValueError, match="is a pickle; set allow_pickle: true"):
        load_fid_inception(folder / "pt_inception.pth")
    model = load_fid_inception(folder / "pt_inception.pth", allow_pickle=True)
    assert isinstance(model, FIDInceptionV3)


def test_missing_and_wrong_weights_are_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist; steerdiff never downloads it"):
        load_fid_inception(tmp_path / "nope.safetensors")
    save_file({"conv.weight": torch.zeros(1)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(ValueError, match="is not an FID Inception-v3 state dict"):
        load_fid_inception(tmp_path / "other.safetensors")
    with pytest.raises(ValueError, match="the inception feature space needs `weights`"):
        InceptionFID()


def test_conversion_script_writes_loadable_safetensors(weights, tmp_path, monkeypatch):
    from scripts.convert_inception_weights import main

    folder, reference = weights
    target = tmp_path / "converted.safetensors"
    monkeypatch.setattr("sys.argv", ["convert", str(folder / "pt_inception.pth"), str(target)])
    main()
    converted = load_fid_inception(target).state_dict()
    for key, value in reference.state_dict().items():
        if not key.endswith("num_batches_tracked"):
            assert torch.equal(converted[key], value), key
