"""`steerdiff fid`: folder-to-folder FID / KID / FD-DINOv2 / CLIP-FD / precision-recall on PNGs the tests write, with
random networks (Inception with Kaiming-initialised convolutions so that its features vary; tiny DINOv2 and CLIP):
FID against scipy's sqrtm on the same features, KID against its formula written out, statistics files both ways,
each preprocessing mode against a reference written from its tool's code, the cache, sharding, and the errors."""

from __future__ import annotations

import json
import threading

import numpy as np
import pytest
import torch
from PIL import Image

from steerdiff.cli import main


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    from safetensors.torch import save_file
    from torch import nn
    from transformers import CLIPConfig, CLIPModel, Dinov2Config, Dinov2Model

    from steerdiff.metrics.inception import FIDInceptionV3

    root = tmp_path_factory.mktemp("fid")
    torch.manual_seed(0)
    inception = FIDInceptionV3()
    for module in inception.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
    save_file({k: v.contiguous() for k, v in inception.state_dict().items()}, str(root / "inception.safetensors"))
    Dinov2Model(Dinov2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37,
                             image_size=224, patch_size=16)).save_pretrained(root / "dinov2")
    text = dict(hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2, vocab_size=1000,
                max_position_embeddings=16, bos_token_id=0, eos_token_id=1, pad_token_id=1)
    vision = dict(hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2, image_size=224, patch_size=32)
    CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=16)).save_pretrained(root / "clip")
    rng = np.random.default_rng(0)
    for name, n, low in (("real", 14, 0), ("fake", 12, 60)):
        (root / name / "nested").mkdir(parents=True)
        for i in range(n):
            pixels = (rng.random((20, 20, 3)) * 190 + low).astype(np.uint8)
            Image.fromarray(pixels).save(root / name / ("nested" if i % 3 == 0 else "") / f"{i:03d}.png")
    return root


def _run(capsys, *args):
    rc = main(["fid", *map(str, args)])
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


def _dino(assets, tmp_path, *extra, low_rank=True):
    """DINOv2 options (the tiny network's features are 32-d; the folders have 12-14 images: low rank allowed)."""
    return [assets / "real", assets / "fake", "--features", "dinov2", "--model", assets / "dinov2", "--cache-dir",
            tmp_path / "cache", "--num-workers", "0", "--no-progress", *(["--allow-low-rank"] if low_rank else []), *extra]


def test_fid_equals_scipy_sqrtm_on_the_same_features(assets, tmp_path, capsys):
    from scipy import linalg

    common = ["--weights", assets / "inception.safetensors", "--cache-dir", tmp_path / "cache", "--num-workers", "1",
              "--no-progress"]
    rc, out, err = _run(capsys, assets / "real", assets / "fake", *common, "--allow-low-rank", "--json", "--kid",
                        "--kid-subset-size", "10", "--precision-recall")
    assert rc == 0, err
    result = json.loads(out)
    cached = [*common[:-2], "0", "--no-progress"]  # the features are cached now: no decoding workers needed
    assert _run(capsys, "--save-features", assets / "real", tmp_path / "real.npz", *cached)[0] == 0
    assert _run(capsys, "--save-features", assets / "fake", tmp_path / "fake.npz", *cached)[0] == 0
    f1, f2 = (np.load(tmp_path / f"{n}.npz")["features"] for n in ("real", "fake"))
    assert f1.shape == (14, 2048) and f2.shape == (12, 2048) and f1.std(0).mean() > 1e-3  # features that vary
    mu1, mu2, s1, s2 = f1.mean(0), f2.mean(0), np.cov(f1, rowvar=False), np.cov(f2, rowvar=False)
    # the textbook formula with scipy's sqrtm, on the span of the centred features (24 of 2048 dimensions): both
    # covariances live there, so S1 S2 = Q (Q^T S1 Q)(Q^T S2 Q) Q^T and the trace of its root is that of the small
    # product's (a 2048 x 2048 sqrtm takes 20 s)
    q, _ = np.linalg.qr(np.concatenate([f1 - mu1, f2 - mu2]).T)
    root, _ = linalg.sqrtm((q.T @ s1 @ q) @ (q.T @ s2 @ q), disp=False)
    reference = float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(root.real))
    assert result["fid"] == pytest.approx(reference, rel=1e-6)
    assert result["num_images"] == [14, 12] and result["low_rank"] is True and result["feature_dim"] == 2048
    assert set(result["kid"]) == {"mean", "std", "subsets", "subset_size"} and result["kid"]["subset_size"] == 10
    assert 0 <= result["precision"] <= 1 and 0 <= result["recall"] <= 1
    assert result["settings"]["mode"] == "pytorch-fid"
    # the feature files and pytorch-fid statistics files are inputs too, and give the same number
    assert json.loads(_run(capsys, tmp_path / "real.npz", tmp_path / "fake.npz", "--weights", assets / "inception.safetensors",
                           "--allow-low-rank", "--json")[1])["fid"] == pytest.approx(result["fid"], rel=1e-12)


def test_kid_equals_its_formula_written_out():
    from steerdiff.metrics.kid import kernel_inception_distance

    rng = np.random.default_rng(1)
    x, y = rng.normal(size=(9, 5)), rng.normal(0.3, 1.2, size=(9, 5))

    def k(a, b):
        return (a @ b / 5 + 1) ** 3

    m = 9
    xx = sum(k(x[i], x[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    yy = sum(k(y[i], y[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    xy = sum(k(x[i], y[j]) for i in range(m) for j in range(m)) / m**2
    mean, std = kernel_inception_distance(x, y, subsets=1, subset_size=1000)  # one subset of all: the full estimate
    assert mean == pytest.approx(xx + yy - 2 * xy, rel=1e-12) and std == 0
    # subsets: the mean over subsets drawn as documented (numpy default_rng(seed), without replacement)
    rng2 = np.random.default_rng(7)
    values = []
    for _ in range(3):
        i, j = rng2.choice(9, 4, replace=False), rng2.choice(9, 4, replace=False)
        a, b = x[i], y[j]
        kxx, kyy, kxy = (a @ a.T / 5 + 1) ** 3, (b @ b.T / 5 + 1) ** 3, (a @ b.T / 5 + 1) ** 3
        values.append((kxx.sum() - np.trace(kxx) + kyy.sum() - np.trace(kyy)) / 12 - 2 * kxy.mean())
    assert kernel_inception_distance(x, y, subsets=3, subset_size=4, seed=7) == pytest.approx((np.mean(values), np.std(values)), rel=1e-12)


def test_statistics_files_load_in_both_directions(assets, tmp_path, capsys):
    rc, out, _ = _run(capsys, *_dino(assets, tmp_path, "--json", "--bootstrap", "50"))
    assert rc == 0
    fd = json.loads(out)["fd_dinov2"]
    boot = json.loads(out)["fd_dinov2_bootstrap_95"]
    assert boot["rounds"] == 50 and boot["low"] < boot["high"] and boot["std"] > 0
    assert _run(capsys, "--save-stats", assets / "real", tmp_path / "real_stats.npz", *_dino(assets, tmp_path)[2:])[0] == 0
    with np.load(tmp_path / "real_stats.npz") as f:  # pytorch-fid's format: mu and sigma
        assert sorted(f.files) == ["mu", "sigma"] and f["sigma"].shape == (32, 32) and f["mu"].dtype == np.float64
        mu, sigma = f["mu"], f["sigma"]
    np.savez_compressed(tmp_path / "cleanfid_clean_custom_na.npz", mu=mu, sigma=sigma)  # clean-fid's statistics file
    args = _dino(assets, tmp_path, "--json")
    for stats in (tmp_path / "real_stats.npz", tmp_path / "cleanfid_clean_custom_na.npz"):
        rc, out, _ = _run(capsys, stats, *args[1:])
        assert rc == 0 and json.loads(out)["fd_dinov2"] == pytest.approx(fd, rel=1e-10)
    assert _run(capsys, "--save-features", assets / "fake", tmp_path / "fake_feats.npz", *args[2:])[0] == 0
    with np.load(tmp_path / "fake_feats.npz") as f:  # clean-fid's KID statistics hold the features as "feats"
        np.savez_compressed(tmp_path / "fake_kid.npz", feats=f["features"])
    rc, out, _ = _run(capsys, tmp_path / "real_stats.npz", tmp_path / "fake_kid.npz", *args[2:])
    assert rc == 0 and json.loads(out)["fd_dinov2"] == pytest.approx(fd, rel=1e-10)
    rc, _, err = _run(capsys, tmp_path / "real_stats.npz", tmp_path / "fake_kid.npz", *args[2:], "--kid")
    assert rc == 2 and "--kid need features" in err and "real_stats.npz holds statistics only" in err


def _u8(files):
    return [np.asarray(Image.open(f).convert("RGB")) for f in files]


def _pytorch_fid_input(pixels):
    """pytorch-fid: ToTensor (u8 / 255), then in InceptionV3.forward F.interpolate(bilinear, align_corners=False), 2x - 1."""
    x = torch.from_numpy(pixels).permute(2, 0, 1).float().div(255)[None]
    return 2 * torch.nn.functional.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False) - 1


def _clean_fid_input(pixels):
    """clean-fid: each channel a float32 'F' PIL image, bicubic to 299, clip to [0, 255]; then (x - 128) / 128."""
    chans = []
    for c in range(3):
        img = Image.fromarray(pixels[:, :, c].astype(np.float32), mode="F").resize((299, 299), resample=Image.BICUBIC)
        chans.append(np.asarray(img).clip(0, 255).reshape(299, 299, 1))
    x = torch.from_numpy(np.concatenate(chans, axis=2).astype(np.float32)).permute(2, 0, 1)[None]
    return (x - 128) / 128


def _torch_fidelity_input(pixels):
    """torch-fidelity: TensorFlow 1.x bilinear (src = dst * in / out; lo = floor; hi = min(lo + 1, in - 1)) per pixel,
    written as loops; then (x - 128) / 128."""
    h, w = pixels.shape[:2]
    src = pixels.astype(np.float32)
    out = np.empty((299, 299, 3), dtype=np.float32)
    sy, sx = np.float32(h / 299), np.float32(w / 299)
    for i in range(299):
        y = np.float32(i) * sy
        y0 = int(y)
        y1, dy = min(y0 + 1, h - 1), y - np.float32(y0)
        for j in range(299):
            x = np.float32(j) * sx
            x0 = int(x)
            x1, dx = min(x0 + 1, w - 1), x - np.float32(x0)
            top = src[y0, x0] + (src[y0, x1] - src[y0, x0]) * dx
            bottom = src[y1, x0] + (src[y1, x1] - src[y1, x0]) * dx
            out[i, j] = top + (bottom - top) * dy
    return (torch.from_numpy(out).permute(2, 0, 1)[None] - 128) / 128


@pytest.mark.parametrize("mode,reference,tolerance", [("pytorch-fid", _pytorch_fid_input, 0.0),
                                                      ("clean", _clean_fid_input, 0.0),
                                                      ("torch-fidelity", _torch_fidelity_input, 1e-4)])
def test_each_preprocessing_mode_matches_its_tool(mode, reference, tolerance, assets, tmp_path):
    """The folder path (decode in the DataLoader, resize by the mode, normalise, Inception) against the tool's own
    input pipeline written from its code, on the same PNGs and the same network."""
    from steerdiff.metrics.features import InceptionFeatures
    from steerdiff.metrics.folder_features import folder_features, list_images

    files = list_images(assets / "real")[:3]
    sub = tmp_path / "three"
    sub.mkdir()
    for f in files:
        (sub / f.name).write_bytes(f.read_bytes())
    space = InceptionFeatures(str(assets / "inception.safetensors"), mode=mode, batch_size=2)
    ours = folder_features(sub, space, cache_dir=tmp_path / "cache", progress=False)
    inputs = torch.cat([reference(p) for p in _u8(list_images(sub))])
    with torch.no_grad():
        expected = space.model()(inputs).double()
    if tolerance == 0.0:
        assert torch.equal(ours, expected)
    else:
        assert (ours - expected).abs().max() <= tolerance * expected.abs().max()


def test_the_benchmark_metrics_and_the_tool_share_one_feature_path(assets, tmp_path):
    """``fid`` / ``kid`` / ``fd_dinov2`` in a benchmark take features of in-memory samples in [-1, 1]; on the same
    images they equal the folder tool's, bit for bit."""
    from steerdiff.metrics.features import DINOv2Features, InceptionFeatures
    from steerdiff.metrics.folder_features import folder_features, list_images
    from steerdiff.metrics.registry import make_metric

    files = list_images(assets / "fake")
    images = torch.from_numpy(np.stack(_u8(files))).permute(0, 3, 1, 2).float() / 127.5 - 1
    for space in (DINOv2Features(str(assets / "dinov2"), batch_size=5),
                  InceptionFeatures(str(assets / "inception.safetensors"), batch_size=5)):
        assert torch.equal(space(images), folder_features(assets / "fake", space, cache_dir=tmp_path, progress=False))
    kid = make_metric("kid", weights=str(assets / "inception.safetensors"), reference=str(assets / "fake"), subsets=2,
                      subset_size=5)
    fd = make_metric("fd_dinov2", model=str(assets / "dinov2"), reference=str(assets / "fake"))
    assert kid.keys == ("kid", "kid_std") and fd.keys == ("fd_dinov2",)


def test_features_are_cached_by_content_and_independent_of_the_process_count(assets, tmp_path, monkeypatch):
    import steerdiff.metrics.folder_features as ff
    from steerdiff.benchmark.sharding import Shard
    from steerdiff.metrics.features import DINOv2Features

    space = DINOv2Features(str(assets / "dinov2"), batch_size=2)
    monkeypatch.setattr(ff, "CHUNK_BATCHES", 2)  # chunks of 4 images: several per process
    single = ff.folder_features(assets / "real", space, cache_dir=tmp_path / "one", progress=False)

    class Barrier:
        def __init__(self):
            self.barrier = threading.Barrier(2)

        def wait_for_everyone(self):
            self.barrier.wait()

    state, results = Barrier(), {}

    def rank(r):
        shard = Shard(rank=r, world_size=2, _state=state)
        results[r] = ff.folder_features(assets / "real", space, cache_dir=tmp_path / "two", progress=False, shard=shard)

    threads = [threading.Thread(target=rank, args=(r,)) for r in (0, 1)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    assert torch.equal(results[0], single) and torch.equal(results[1], single)
    monkeypatch.setattr(ff, "_compute", lambda *a, **k: pytest.fail("recomputed a cached folder"))
    assert torch.equal(ff.folder_features(assets / "real", space, cache_dir=tmp_path / "one", progress=False), single)
    copy = tmp_path / "copy"
    copy.mkdir()
    for f in ff.list_images(assets / "real"):
        (copy / f.relative_to(assets / "real")).parent.mkdir(parents=True, exist_ok=True)
        (copy / f.relative_to(assets / "real")).write_bytes(f.read_bytes())
    Image.new("RGB", (20, 20), (1, 2, 3)).save(copy / "000.png")  # one changed file: not the cached features
    with pytest.raises(pytest.fail.Exception, match="recomputed"):
        ff.folder_features(copy, space, cache_dir=tmp_path / "one", progress=False)


def test_clip_features_and_mixed_sizes(assets, tmp_path, capsys):
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    for i, size in enumerate([(20, 20), (20, 20), (30, 24)]):
        Image.new("RGB", size, (40 * i, 80, 120)).save(mixed / f"{i}.png")
    rc, out, err = _run(capsys, mixed, assets / "fake", "--features", "clip", "--model", assets / "clip", "--mode",
                        "clean", "--cache-dir", tmp_path / "cache", "--num-workers", "0", "--no-progress", "--allow-low-rank")
    assert rc == 0, err
    assert "images of 2 sizes (2 at 20x20, 1 at 30x24); each is resized to 224x224 by the clean preprocessing" in out
    assert out.strip().splitlines()[-1].startswith("fd_clip: ")


@pytest.mark.parametrize("case", ["unreadable", "empty", "missing", "low_rank", "no_weights", "stats_output_suffix"])
def test_errors_name_the_problem(case, assets, tmp_path, capsys):
    folder = tmp_path / "f"
    folder.mkdir()
    args = [folder, assets / "fake", "--weights", assets / "inception.safetensors", "--cache-dir", tmp_path, "--no-progress",
            "--allow-low-rank"]
    if case == "unreadable":
        Image.new("RGB", (8, 8)).save(folder / "a.png")
        (folder / "b.png").write_bytes(b"not an image")
        message = f"{str(folder / 'b.png')!r} is not a readable image"
    elif case == "empty":
        message = "holds no images (.png, .jpg, .jpeg, .webp, searched recursively)"
    elif case == "missing":
        args[0] = tmp_path / "nothing"
        message = "is neither a folder of images nor an existing .npz statistics file"
    elif case == "low_rank":
        args = _dino(assets, tmp_path, low_rank=False)
        message = "has 14 images for 32-dimensional features: its covariance has rank at most 13 < 32"
    elif case == "no_weights":
        args = [assets / "real", assets / "fake"]
        message = "--weights: the Inception weights file is needed (steerdiff never downloads it)"
    else:
        args = ["--save-stats", assets / "real", tmp_path / "stats.txt", "--weights", assets / "inception.safetensors"]
        message = "must end in one of .npz"
    rc, _, err = _run(capsys, *args)
    assert rc == 2 and message in err and "Traceback" not in err


@pytest.mark.parametrize("extra,message", [
    (["--batch-size", "0"], "--batch-size must be >= 1, got 0"),
    (["--kid-subsets", "0"], "--kid-subsets must be >= 1, got 0"),
    (["--kid-subset-size", "1"], "--kid-subset-size must be >= 2, got 1"),
    (["--bootstrap", "-1"], "--bootstrap and --num-workers must be >= 0"),
    (["--num-workers", "-2"], "--bootstrap and --num-workers must be >= 0"),
    (["--device", "tpu"], "device: 'tpu' is not a torch device"),
    (["--features", "dinov2"], "--model: --features dinov2 needs the network's local transformers folder"),
    (["--save-stats", "--save-features"], "give --save-stats or --save-features, not both"),
])
def test_bad_options_are_refused_before_any_image_is_read(extra, message, assets, tmp_path, capsys, monkeypatch):
    import steerdiff.metrics.folder_features as ff

    monkeypatch.setattr(ff, "list_images", lambda *a, **k: pytest.fail("images read before the options were checked"))
    rc, _, err = _run(capsys, assets / "real", assets / "fake", "--weights", assets / "inception.safetensors", *extra)
    assert rc == 2 and message in err and "Traceback" not in err
