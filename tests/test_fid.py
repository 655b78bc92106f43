"""`flatdino fid` metrics engine: FID/sFID/IS/precision-recall/FD-DINOv2, caching, weights lookup.

The Inception is a random-weight torchvision Inception-v3 re-laid out like clean-fid's torchscript
port (so the real extractor code runs on it), fed 75 px instead of 299 px to keep the tests fast.
"""

import os
import json
import subprocess
import sys
import time
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest
import scipy.linalg
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision
from PIL import Image

from flatdino_cli.analysis import inception, inception_weights
from flatdino_cli.analysis.fid import open_source, run_fid, source_summary
from flatdino_cli.fid_metrics import Gaussian, frechet_distance, inception_score, precision_recall
from flatdino_cli.analysis.inception import TFInception, load_inception, tf1_resize
from flatdino_cli.errors import UserError

N, RES, NET_RES = 32, 64, 75  # images, their size, the size fed to the test Inception


class _Mixed6(nn.Module):
    """torchvision's Mixed_6d with its 1x1 branch reachable as `.conv`, like the port's mixed_6."""

    def __init__(self, block: nn.Module):
        super().__init__()
        self.block, self.conv = block, block.branch1x1

    def forward(self, x):
        return self.block(x)


class PortLayout(nn.Module):
    """`layers` + `output` named as in inception-2015-12-05.pt, forward(img, return_features) as there."""

    def __init__(self, layers: nn.Sequential, output: nn.Linear):
        super().__init__()
        self.layers, self.output = layers, output

    def forward(self, img: torch.Tensor, return_features: bool = False) -> torch.Tensor:
        x = (tf1_resize(img, 299) - 128) / 128
        feats = self.layers(x).reshape(-1, 2048)
        return feats if return_features else F.softmax(self.output(feats), 1)


def random_inception() -> PortLayout:
    torch.manual_seed(0)
    tv = torchvision.models.inception_v3(weights=None, aux_logits=False, init_weights=False).eval()
    for m in tv.modules():  # He init keeps activations O(1) through the 94 ReLU layers
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
    for b in ("branch1x1", "branch3x3_2a", "branch3x3_2b", "branch3x3dbl_3a", "branch3x3dbl_3b", "branch_pool"):
        getattr(tv.Mixed_7c, b).bn.weight.data.mul_(20)  # the last convs: pool features ~0.4 as the real net's
    names = [("conv", tv.Conv2d_1a_3x3), ("conv_1", tv.Conv2d_2a_3x3), ("conv_2", tv.Conv2d_2b_3x3),
             ("pool0", tv.maxpool1), ("conv_3", tv.Conv2d_3b_1x1), ("conv_4", tv.Conv2d_4a_3x3),
             ("pool1", tv.maxpool2), ("mixed", tv.Mixed_5b), ("mixed_1", tv.Mixed_5c), ("mixed_2", tv.Mixed_5d),
             ("mixed_3", tv.Mixed_6a), ("mixed_4", tv.Mixed_6b), ("mixed_5", tv.Mixed_6c),
             ("mixed_6", _Mixed6(tv.Mixed_6d)), ("mixed_7", tv.Mixed_6e), ("mixed_8", tv.Mixed_7a),
             ("mixed_9", tv.Mixed_7b), ("mixed_10", tv.Mixed_7c), ("pool2", tv.avgpool)]
    return PortLayout(nn.Sequential(OrderedDict(names)), tv.fc).eval()


class Counting:
    """Wraps an extractor (same identity, so the same cache) and counts the images it sees."""

    def __init__(self, inner, fail_after: int | None = None):
        self.inner, self.images, self.calls, self.fail_after = inner, 0, 0, fail_after
        self.name, self.cache_tag, self.adm_compatible = inner.name, inner.cache_tag, inner.adm_compatible

    def __call__(self, images):
        if self.fail_after is not None and self.calls >= self.fail_after:
            raise KeyboardInterrupt("simulated kill")
        self.calls += 1
        self.images += len(images)
        return self.inner(images)


def smooth_images(n: int, seed: int) -> np.ndarray:
    """(n, RES, RES, 3) uint8 with structure at several scales (random-weight nets see texture)."""
    g = torch.Generator().manual_seed(seed)
    x = sum(F.interpolate(torch.randn(n, 3, s, s, generator=g), size=RES, mode="bilinear") for s in (4, 16))
    return (x * 50 + 128).clamp(0, 255).round().byte().permute(0, 2, 3, 1).numpy()


def noisy(x: np.ndarray, sigma: float) -> np.ndarray:
    noise = np.random.default_rng(1).standard_normal(x.shape)  # the same draw for every sigma
    return np.clip(np.rint(x + sigma * noise), 0, 255).astype(np.uint8)


def scipy_fd(x: np.ndarray, y: np.ndarray) -> float:
    """The textbook formula with scipy.linalg.sqrtm, in the span of the centred features.

    Both covariances live in that (<= 62-d) subspace, so the FD is unchanged; sqrtm on the raw
    2048-d rank-31 covariances would add ~1e-4 of round-off (sqrt of 2000 zero eigenvalues).
    """
    x, y = x.astype(np.float64), y.astype(np.float64)
    q, _ = np.linalg.qr(np.concatenate([x - x.mean(0), y - y.mean(0)]).T)  # (D, n_x + n_y)
    s1, s2 = np.cov(x @ q, rowvar=False), np.cov(y @ q, rowvar=False)
    covmean = scipy.linalg.sqrtm(s1 @ s2).real
    d = x.mean(0) - y.mean(0)
    return float(d @ d + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


def write_npz(path, arr):
    np.savez(path, arr_0=arr)
    return path


@pytest.fixture(scope="module")
def net():
    return random_inception()


@pytest.fixture(scope="module")
def ext(net):
    return TFInception(net, size=NET_RES, name="random Inception-v3 (test)")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("fid")
    x = smooth_images(N, 0)
    sets = {"x": write_npz(d / "x.npz", x)}
    for s in (6, 24, 64):
        sets[s] = write_npz(d / f"y{s}.npz", noisy(x, s))
    sets["x8"] = write_npz(d / "x8.npz", x[:8])
    (d / "x8dir").mkdir()
    for i, im in enumerate(x[:8]):
        Image.fromarray(im).save(d / "x8dir" / f"{i:03d}.png")
    sets["x8dir"], sets["images"] = d / "x8dir", x
    return sets


# ============================================================================ acceptance: FID
def test_fid_of_a_set_with_itself_is_zero(data, ext):
    out = run_fid(data["x"], data["x"], extractor=ext, progress=False)
    assert abs(out["fid"]) <= 1e-6 and abs(out["sfid"]) <= 1e-6
    assert out["precision"] == 1.0 and out["recall"] == 1.0  # identical sets: 1/1
    assert out["num_samples"] == out["num_ref"] == N and out["feature_extractor"] == ext.name


def test_fid_matches_scipy_on_the_same_features(data, ext):
    out = run_fid(data[24], data["x"], extractor=ext, progress=False)
    fx = source_summary(open_source(data["x"], "R"), ext, progress=False).pool  # cached by run_fid
    fy = source_summary(open_source(data[24], "S"), ext, progress=False).pool
    assert fx.shape == (N, 2048)
    ref = scipy_fd(fy, fx)
    assert ref > 1e-3  # the noise is visible to the network, so the comparison means something
    assert out["fid"] == pytest.approx(ref, rel=1e-6)


def test_fid_grows_monotonically_with_noise(data, ext):
    fids = [run_fid(data[s], data["x"], extractor=ext, progress=False)["fid"] for s in (6, 24, 64)]
    assert 0 < fids[0] < fids[1] < fids[2], fids


def test_npz_and_folder_give_the_same_fid(data, ext):
    a = run_fid(data["x8dir"], data[24], extractor=ext, progress=False)
    b = run_fid(data["x8"], data[24], extractor=ext, progress=False)
    assert a["fid"] == pytest.approx(b["fid"], rel=1e-12) and a["sfid"] == pytest.approx(b["sfid"], rel=1e-12)
    assert a["is"] == pytest.approx(b["is"], rel=1e-12)


# ============================================================================ caching and resume
def test_reference_cache_is_reused(data, ext, tmp_path):
    ref = write_npz(tmp_path / "ref.npz", data["images"][:5])
    c = Counting(ext)
    run_fid(data[64], ref, extractor=c, progress=False)
    first = c.images
    assert list(tmp_path.glob("ref.npz.flatdino-stats-*.npz"))  # beside the reference
    run_fid(data[6], ref, extractor=c, progress=False)
    assert c.images == first  # samples and reference both came from their caches


def test_extraction_resumes_after_a_kill(data, ext, tmp_path):
    images = data["images"][:12]
    src = open_source(write_npz(tmp_path / "s.npz", images), "S")
    killed = Counting(ext, fail_after=2)  # batches of 4, chunks of 8: dies starting the 2nd chunk
    with pytest.raises(KeyboardInterrupt):
        source_summary(src, killed, batch_size=4, chunk=8, progress=False)
    partial = list(tmp_path.glob("*.partial/chunk-*.npz"))
    assert len(partial) == 1  # the finished chunk, nothing half-written
    resumed = Counting(ext)
    s = source_summary(src, resumed, batch_size=4, chunk=8, progress=False)
    assert resumed.images == 4  # only what was not finished
    assert not list(tmp_path.glob("*.partial"))
    whole = source_summary(open_source(data["x"], "R"), ext, progress=False).pool[:12]  # one uninterrupted pass
    np.testing.assert_allclose(s.pool, whole, rtol=1e-4, atol=1e-5)  # other batch sizes: other float32 sums
    again = Counting(ext)
    source_summary(src, again, progress=False)
    assert again.images == 0


def test_changed_contents_are_not_served_from_cache(data, ext, tmp_path):
    p = write_npz(tmp_path / "s.npz", data["images"][:4])
    a = source_summary(open_source(p, "S"), ext, progress=False)
    write_npz(p, data["images"][4:8])
    b = source_summary(open_source(p, "S"), ext, progress=False)
    assert not np.allclose(a.pool, b.pool)


# ============================================================================ reference formats
def test_adm_reference_batch_statistics(data, ext, tmp_path):
    x = source_summary(open_source(data["x"], "R"), ext, progress=False).gauss  # cached
    rng = np.random.default_rng(0)
    mu, mu_s = x["pool"].mu + 0.01, x["spatial"].mu
    sigma = x["pool"].cov() + np.eye(2048) * 1e-4
    sigma_s = x["spatial"].cov() + np.diag(rng.uniform(0.1, 1, x["spatial"].dim))
    ref = tmp_path / "VIRTUAL_test.npz"
    np.savez(ref, arr_0=data["images"][:8], mu=mu, sigma=sigma, mu_s=mu_s, sigma_s=sigma_s)

    plain = run_fid(data[24], ref, extractor=ext, progress=False)  # not TF Inception: stats ignored
    assert plain["fid"] == pytest.approx(run_fid(data[24], data["x8"], extractor=ext, progress=False)["fid"])
    assert any("ignored" in n for n in plain["notes"])

    tf_like = Counting(ext)
    tf_like.adm_compatible = True  # as load_inception's extractor: the file's mu/sigma are used
    out = run_fid(data[24], ref, extractor=tf_like, progress=False)
    s = source_summary(open_source(data[24], "S"), ext, progress=False)
    assert out["fid"] == pytest.approx(frechet_distance(s.gauss["pool"], Gaussian(mu, sigma)), rel=1e-9)
    assert out["sfid"] == pytest.approx(frechet_distance(s.gauss["spatial"], Gaussian(mu_s, sigma_s)), rel=1e-9)
    assert out["precision"] == plain["precision"]  # precision/recall still from the reference images

    stats_only = tmp_path / "cleanfid_stats.npz"
    np.savez(stats_only, mu=mu, sigma=sigma)
    out = run_fid(data[24], stats_only, extractor=tf_like, progress=False)
    assert out["fid"] == pytest.approx(frechet_distance(s.gauss["pool"], Gaussian(mu, sigma)), rel=1e-9)
    assert out["num_ref"] is None and "precision" not in out and "sfid" not in out
    assert any("precision/recall omitted" in n for n in out["notes"])
    with pytest.raises(UserError, match="only TF-Inception statistics"):
        run_fid(data[24], stats_only, extractor=ext, progress=False)


def test_bad_inputs_are_one_line_errors(data, ext, tmp_path):
    with pytest.raises(UserError, match="no such file"):
        run_fid(tmp_path / "nope.npz", data["x"], extractor=ext)
    np.savez(tmp_path / "f.npz", arr_0=np.zeros((4, 8, 8, 3), np.float32))
    with pytest.raises(UserError, match="expected uint8"):
        run_fid(tmp_path / "f.npz", data["x"], extractor=ext)
    with pytest.raises(UserError, match="1 image"):
        run_fid(data["x"], write_npz(tmp_path / "one.npz", data["images"][:1]), extractor=ext)
    d = tmp_path / "mixed"
    d.mkdir()
    for i, im in enumerate(data["images"][:5]):
        Image.fromarray(im).save(d / f"{i}.png")
    Image.fromarray(data["images"][0][:32]).save(d / "9.png")
    with pytest.raises(UserError, match="9.png"):
        run_fid(d, data["x"], extractor=ext, progress=False)


def test_json_output_and_fd_dinov2(data, ext, tmp_path):
    class TinyEncoder(nn.Module):  # (B, 3, 32, 32) -> (B, 16 tokens, 24)
        image_size = 32

        def __init__(self):
            super().__init__()
            torch.manual_seed(1)
            self.patch = nn.Conv2d(3, 24, 8, stride=8)

        def forward(self, x):
            return self.patch(x).flatten(2).transpose(1, 2)

    enc = TinyEncoder()
    same = run_fid(data["x"], data["x"], extractor=ext, dino_encoder=enc, progress=False)
    out = run_fid(data[64], data["x"], extractor=ext, dino_encoder=enc, json_out=tmp_path / "m.json", progress=False)
    assert abs(same["fd_dinov2"]) < 1e-6 < out["fd_dinov2"]
    assert "mean-pooled" in out["fd_dinov2_features"]
    on_disk = json.loads((tmp_path / "m.json").read_text())
    assert on_disk["fid"] == out["fid"] and set(on_disk) >= {"fid", "sfid", "is", "is_std", "precision", "recall",
                                                              "fd_dinov2", "num_samples", "num_ref"}


# ============================================================================ Inception weights
def test_missing_weights_fail_fast_naming_both_options(data, tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    t = time.perf_counter()
    with pytest.raises(UserError) as e:
        run_fid(data["x"], data["x"])
    assert time.perf_counter() - t < 5
    msg = str(e.value)
    assert "--inception-weights" in msg and str(tmp_path / "flatdino" / inception_weights.INCEPTION_FILE) in msg and "\n" not in msg
    with pytest.raises(UserError, match="nope.pt"):
        run_fid(data["x"], data["x"], inception_weights=tmp_path / "nope.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a torchscript file")
    assert inception_weights.find_inception_weights(tmp_path / "junk.pt") == tmp_path / "junk.pt"
    with pytest.raises(UserError, match="cannot load as torchscript"):
        load_inception(tmp_path / "junk.pt")


def test_missing_weights_fail_before_torch_is_imported(data, tmp_path):
    code = ("import sys\nfrom flatdino_cli.analysis import fid\nfrom flatdino_cli.errors import UserError\n"
            f"try:\n    fid.run_fid({str(data['x'])!r}, {str(data['x'])!r})\n"
            "except UserError as e:\n    print('torch' in sys.modules, e)\n    sys.exit(1)\n")
    t = time.perf_counter()
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                       env={**os.environ, "XDG_CACHE_HOME": str(tmp_path)})
    assert p.returncode == 1 and p.stdout.startswith("False Inception weights not found"), p.stdout + p.stderr
    assert time.perf_counter() - t < 5


class _TinyMixed6(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.main = nn.Conv2d(3, 192, 1), nn.Conv2d(3, 16, 1)

    def forward(self, x):
        return self.main(x)


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:FutureWarning")
def test_torchscript_file_from_cleanfid_cache(tmp_path, monkeypatch):
    """A file laid out like inception-2015-12-05.pt (cheap layers) is found in the user's cache,
    loaded without network access, verified, and gives ADM's feature sizes at 299 px."""
    torch.manual_seed(0)
    layers = OrderedDict((n, nn.Identity()) for n in inception._LAYERS)
    layers.update(conv=nn.AdaptiveAvgPool2d(17), mixed_6=_TinyMixed6(), mixed_10=nn.Conv2d(16, 2048, 1),
                  pool2=nn.AdaptiveAvgPool2d(1))
    net = PortLayout(nn.Sequential(layers), nn.Linear(2048, 1008))
    cache = tmp_path / "flatdino"
    cache.mkdir()
    torch.jit.script(net).save(str(cache / inception_weights.INCEPTION_FILE))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert inception_weights.find_inception_weights(cache) == cache / inception_weights.INCEPTION_FILE  # a folder works too
    ext = load_inception(inception_weights.find_inception_weights())
    assert ext.adm_compatible and ext.cache_tag.startswith("tfinception-")
    images = np.random.default_rng(0).integers(0, 256, (3, 40, 40, 3), dtype=np.uint8)
    f = ext(images)
    assert f["pool"].shape == (3, 2048) and f["logits"].shape == (3, 1008) and f["spatial"].shape == (3, 2023)
    with torch.no_grad():  # sFID features: mixed_6.conv, first 7 channels, flattened in TF's (h, w, c) order
        x = nn.AdaptiveAvgPool2d(17)((tf1_resize(torch.from_numpy(images).permute(0, 3, 1, 2).float()) - 128) / 128)
        want = net.layers.mixed_6.conv(x)[:, :7].permute(0, 2, 3, 1).reshape(3, -1)
        np.testing.assert_allclose(f["spatial"], want.numpy(), rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(f["logits"], (torch.from_numpy(f["pool"]) @ net.output.weight.T).numpy(),
                                   rtol=1e-5, atol=1e-5)  # no bias, as ADM's softmax input

    broken = PortLayout(nn.Sequential(OrderedDict((n, nn.Identity()) for n in inception._LAYERS[:5])), net.output)
    torch.jit.script(broken).save(str(tmp_path / "other.pt"))
    with pytest.raises(UserError, match="not laid out like"):
        load_inception(tmp_path / "other.pt")


def test_inception_weights_are_never_taken_from_tmp(tmp_path, monkeypatch):
    import tempfile

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    planted = Path(tempfile.gettempdir()) / inception_weights.INCEPTION_FILE
    made = not planted.exists()
    if made:
        planted.write_bytes(b"planted by someone else")
    try:
        with pytest.raises(UserError, match=str(tmp_path / "cache" / "flatdino" / inception_weights.INCEPTION_FILE)):
            inception_weights.find_inception_weights()
    finally:
        if made:
            planted.unlink()
    mine = tmp_path / "cache" / "flatdino" / inception_weights.INCEPTION_FILE
    mine.parent.mkdir(parents=True)
    mine.write_bytes(b"x")
    assert inception_weights.find_inception_weights() == mine


def test_tf1_resize_samples_like_tensorflow():
    # TF1 resize_bilinear(align_corners=False): out[j] = in at j * in_size / out_size, edge-clamped
    x = torch.arange(4.0).view(1, 1, 1, 4).expand(1, 1, 4, 4)
    y = tf1_resize(x, 8)[0, 0, 0]
    np.testing.assert_allclose(y.numpy(), [0, 0.5, 1, 1.5, 2, 2.5, 3, 3], atol=1e-5)


# ============================================================================ metrics on synthetic features
def test_frechet_distance_matches_scipy_sqrtm_and_low_rank_path():
    rng = np.random.default_rng(0)
    x, y = rng.standard_normal((300, 20)), rng.standard_normal((300, 20)) @ rng.standard_normal((20, 20)) + 0.5
    gx, gy = Gaussian.from_features(x), Gaussian.from_features(y)
    assert gx.root is None  # N > D: the covariance is stored
    s1, s2 = gx.sigma, gy.sigma
    d = gx.mu - gy.mu
    ref = d @ d + np.trace(s1) + np.trace(s2) - 2 * np.trace(scipy.linalg.sqrtm(s1 @ s2).real)
    assert frechet_distance(gx, gy) == pytest.approx(ref, rel=1e-10)
    few = Gaussian.from_features(y[:10])  # N <= D: kept as a root
    assert few.root is not None
    assert frechet_distance(gx, few) == pytest.approx(frechet_distance(gx, Gaussian(few.mu, few.cov())), rel=1e-8)
    assert frechet_distance(few, few) == pytest.approx(0, abs=1e-10)


def test_inception_score():
    assert inception_score(np.zeros((20, 7)))[0] == pytest.approx(1.0)
    confident = np.eye(10)[np.arange(40) % 10] * 60.0  # 10 classes, each predicted with certainty
    mean, std = inception_score(confident, split_size=20)
    assert mean == pytest.approx(10.0, rel=1e-6) and std == pytest.approx(0, abs=1e-9)


def _brute_pr(ref, samples, k):
    d = lambda a, b: ((a[:, None] - b[None]) ** 2).sum(-1)  # noqa: E731
    rr = np.sort(d(ref, ref), 1)[:, k]
    rs = np.sort(d(samples, samples), 1)[:, k]
    drs = d(ref, samples)
    return (drs <= rr[:, None]).any(0).mean(), (drs <= rs[None]).any(1).mean()


def test_precision_recall():
    rng = np.random.default_rng(0)
    a = rng.standard_normal((200, 16)).astype(np.float32)
    assert precision_recall(a, a.copy(), k=3) == (1.0, 1.0)
    far = a + 100
    assert precision_recall(a, far, k=3) == (0.0, 0.0)
    b = (rng.standard_normal((150, 16)) * 1.3 + 0.4).astype(np.float32)
    p, r = precision_recall(a, b, k=3, block=7)  # blocks that do not divide either set
    bp, br = _brute_pr(a.astype(np.float64), b.astype(np.float64), 3)
    assert (p, r) == pytest.approx((bp, br), abs=1 / 150)  # float32 ties at most flip a point or so
    assert 0.05 < p < 0.95 and 0.05 < r < 0.95
