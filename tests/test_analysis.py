"""The paper's analyses: token ablation, PCA, spatial redundancy, k-NN probe, latent-noise robustness
(with rFID and PSNR against the original images)."""

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from flatdino_cli.analysis.ablate import AblateConfig, ablate_units, ablation_heatmaps, run_ablate
from flatdino_cli.analysis.knn import KNNConfig, knn_classify, pooled_embedding, run_knn
from flatdino_cli.analysis.noise import NoiseConfig, run_noise
from flatdino_cli.analysis.pca import (PCAConfig, StreamingCovariance, dims_for, explained_variance, patchify, run_pca,
                                      streamed_pca)
from flatdino_cli.analysis.redundancy import RedundancyConfig, pair_distances, run_redundancy, similarity_by_distance
from flatdino_cli.checkpoint import save_checkpoint
from flatdino_cli.config import DecoderModelConfig, DecoderStageConfig, ExtractConfig, VAEModelConfig, VAEStageConfig
from flatdino_cli.config_yaml import save_config
from flatdino_cli.data import Store, load_rgb
from flatdino_cli.models.pixel_decoder import PixelDecoder
from flatdino_cli.models.vae import FlatVAE
from flatdino_cli.runs import load_run
from flatdino_cli.runtime import CPU
from test_reconstruct import mixed_val_folder, tiny_decoder_run
from test_train_vae import tiny_vae_run

SIDE, PATCH, C = 6, 8, 24  # a 6x6 grid of 8-px patches on 48-px images, as the tiny encoder makes
P, SIZE = SIDE * SIDE, SIDE * PATCH
PRE = {"crop": "adm_center_crop", "crop_size": SIZE, "input_size": SIZE, "interp": "bicubic"}


# ----------------------------------------------------------------------------- fixtures
def make_store(path: Path, data: np.ndarray, labels, paths=None, kind: str = "features") -> Path:
    n = len(data)
    paths = paths or [f"/nonexistent/img{i}.png" for i in range(n)]
    st = Store.create(path, kind, data.shape[1:], n, "float32", identity={"encoder": "test"}, preprocessing=PRE,
                      paths=paths, labels=list(labels))
    st.write_rows(np.arange(n), data)
    st.mark_done(np.arange(n))
    st.finalize()
    st.close()
    return path


def vae_run(path: Path, tokens: int = 4, d: int = 8) -> Path:
    model_cfg = VAEModelConfig(tokens=tokens, latent_dim=d, feature_dim=C, num_patches=P, enc_width=32, enc_depth=1,
                               enc_heads=2, dec_width=32, dec_depth=1, dec_heads=2)
    torch.manual_seed(0)
    save_config(VAEStageConfig(model=model_cfg), path / "config.yaml")
    save_checkpoint(path, "latest", FlatVAE(model_cfg), None, {"step": 0})
    return path


@pytest.fixture(scope="module")
def toy(tmp_path_factory) -> dict:
    """Toy images on disk, a feature store of them (a fixed random projection of each 8x8 patch,
    layer-normalised: cheap stand-in for the tiny encoder) with a val/ split, and a tiny VAE run."""
    from flatdino_cli.data import encoder_input, load_rgb
    from flatdino_cli.toydata import render

    root = tmp_path_factory.mktemp("toy")
    paths, labels = [], []
    for c in range(4):
        for i in range(12):
            p = root / "img" / f"{c}_{i}.png"
            p.parent.mkdir(exist_ok=True)
            render(c, i, SIZE).save(p)
            paths.append(str(p))
            labels.append(c)
    g = torch.Generator().manual_seed(0)
    proj, pos = torch.randn(PATCH * PATCH * 3, C, generator=g), torch.randn(P, C, generator=g)
    x = torch.stack([encoder_input(load_rgb(p), SIZE, SIZE) for p in paths])  # (N, 3, 48, 48)
    feats = torch.nn.functional.layer_norm(patchify(x, PATCH).view(len(paths), P, -1) @ proj + pos, (C,)).numpy()
    val = np.arange(len(paths)) % 4 == 0
    store = make_store(root / "feats", feats[~val], np.array(labels)[~val], [p for p, v in zip(paths, val) if not v])
    make_store(store / "val", feats[val], np.array(labels)[val], [p for p, v in zip(paths, val) if v])
    return {"root": root, "features": store, "vae": vae_run(root / "vae")}


# ----------------------------------------------------------------------------- token ablation
class RegionDecoder(nn.Module):
    """Unit k of the latent writes only the patches p with region[p] == k (nonlinearly)."""

    def __init__(self, region: torch.Tensor, d: int, C: int = 5):
        super().__init__()
        self.region = region
        self.w = nn.Parameter(torch.randn(d, C))

    def decode(self, z: torch.Tensor) -> torch.Tensor:  # (B, U, d) -> (B, P, C)
        return torch.tanh(z @ self.w)[:, self.region] + 0.3


def test_ablation_recovers_each_tokens_region():
    torch.manual_seed(0)
    T, d = 5, 3
    region = torch.randint(0, T, (P,))
    region[:T] = torch.arange(T)  # every token owns at least one patch
    dec = RegionDecoder(region, d)
    batches = [torch.randn(4, T, d) for _ in range(3)]
    maps = ablation_heatmaps(dec.decode, batches, unit_batch=2)  # (T, P)
    assert maps.shape == (T, P)
    support = maps > 1e-9
    assert np.array_equal(support, (region[None, :] == torch.arange(T)[:, None]).numpy())
    assert np.array_equal(maps.argmax(0), region.numpy())
    # batching over tokens changes nothing; the average is over all 12 latents
    one = ablation_heatmaps(dec.decode, batches, unit_batch=1)
    np.testing.assert_allclose(maps, one, rtol=1e-6)
    z = torch.cat(batches)
    k = 2
    diff = (dec.decode(ablate_units(z, torch.tensor([k]))[0]) - dec.decode(z)).norm(dim=-1).mean(0)
    np.testing.assert_allclose(maps[k], diff.detach().numpy(), rtol=1e-5, atol=1e-7)


def test_ablation_unit_is_generic_per_patch_latents():
    """An FAE-kind latent (one row per patch): ablating row k changes patch k only -> a diagonal map."""
    torch.manual_seed(1)
    dec = RegionDecoder(torch.arange(P), d=4)
    maps = ablation_heatmaps(dec.decode, [torch.randn(3, P, 4)], unit_batch=16)
    assert maps.shape == (P, P)
    assert np.array_equal(maps > 1e-9, np.eye(P, dtype=bool))


def test_run_ablate_writes_figures_and_array(toy, tmp_path):
    r = run_ablate(AblateConfig(toy["vae"], toy["features"] / "val", tmp_path, n=10, batch_size=4, unit_batch=3),
                   progress=False)
    maps = np.load(tmp_path / "heatmaps.npy")
    assert maps.shape == (4, P) and np.isfinite(maps).all() and (maps >= 0).all() and maps.max() > 0
    assert r["n_images"] == 10 and r["grid"] == [SIDE, SIDE] and r["unit"] == "token"
    assert (tmp_path / "token_ablation.png").stat().st_size > 5000
    assert r["overlay"] == "token_ablation_overlay.png" and (tmp_path / r["overlay"]).stat().st_size > 5000
    on_disk = json.loads((tmp_path / "ablation.json").read_text())
    assert len(on_disk["per_unit"]) == 4 and 0 <= on_disk["per_unit"][0]["entropy"] <= 1


# ----------------------------------------------------------------------------- PCA
def data_with_covariance(eigvals: np.ndarray, n: int, seed: int = 0, offset: float = 50.0) -> np.ndarray:
    """n vectors whose sample covariance (ddof=1) is exactly Q diag(eigvals) Q^T for a random rotation Q."""
    rng = np.random.default_rng(seed)
    D = len(eigvals)
    z = rng.standard_normal((n, D))
    z -= z.mean(0)
    z = z @ np.linalg.inv(np.linalg.cholesky(np.cov(z.T))).T  # sample covariance exactly I
    q, _ = np.linalg.qr(rng.standard_normal((D, D)))
    return z * np.sqrt(eigvals) @ q.T + offset + rng.standard_normal(D)


def test_pca_exact_dims_on_known_spectrum():
    # cumulative: .50 .70 .80 .88 .93 .96 .98 .992 .996 1.0 -> 95 % at 6 components, 99 % at 8
    eig = np.array([50, 20, 10, 8, 5, 3, 2, 1.2, 0.4, 0.4])
    x = data_with_covariance(eig, 3000)
    r = streamed_pca((torch.from_numpy(c) for c in np.array_split(x, 7)), 10, chunk_size=128)
    assert r["dims"] == {"0.95": 6, "0.99": 8} and r["n_vectors"] == 3000
    np.testing.assert_allclose(r["explained_variance_ratio"], eig / eig.sum(), atol=1e-10)
    assert dims_for(np.array([0.5, 0.45, 0.04, 0.01])) == {"0.95": 2, "0.99": 3}  # exact hit counts


def test_covariance_streams_in_bounded_chunks_and_matches_numpy():
    rng = np.random.default_rng(1)
    N, D, chunk = 20000, 12, 256
    x = rng.standard_normal((N, D)) @ rng.standard_normal((D, D)) + 1e3  # a large mean: cancellation-prone
    acc = StreamingCovariance(D, chunk_size=chunk)
    for block in np.array_split(x, 9):  # blocks of ~2200 rows arrive; at most 256 are widened at once
        acc.update(block.astype(np.float64))
    assert acc.n == N and acc.peak_rows == chunk and acc.peak_rows * 50 < N
    np.testing.assert_allclose(acc.covariance(), np.cov(x.T), rtol=0, atol=1e-8)
    np.testing.assert_allclose(acc.mean(), x.mean(0), rtol=0, atol=1e-9)
    ev, ratio = explained_variance(acc.covariance())
    np.testing.assert_allclose(ev, np.linalg.eigvalsh(np.cov(x.T))[::-1], rtol=1e-9)


def test_patchify_and_max_vectors():
    img = torch.arange(2 * 3 * 16 * 16, dtype=torch.float32).view(2, 3, 16, 16)
    p = patchify(img, 8)  # (2 * 4, 8*8*3)
    assert p.shape == (8, 192)
    # image 1, patch (row 1, col 0): pixel (row 8 + 2, col 3), channel 1 sits at (2*8 + 3)*3 + 1
    assert p[4 + 2, (2 * 8 + 3) * 3 + 1] == img[1, 1, 10, 3]
    r = streamed_pca((torch.randn(100, 4) for _ in range(5)), 4, chunk_size=30, max_vectors=250)
    assert r["n_vectors"] == 250 and r["peak_chunk_rows"] == 30


def test_run_pca_all_sources(toy, tmp_path):
    cfg = PCAConfig(toy["features"], tmp_path, vae_run=toy["vae"], n=20, batch_size=8, chunk_size=100)
    r = run_pca(cfg, progress=False)
    src = r["sources"]
    assert set(src) == {"pixels", "dino", "recon"}
    assert src["pixels"]["dim"] == PATCH * PATCH * 3 and src["pixels"]["n_vectors"] == 20 * P
    assert src["dino"]["dim"] == C and src["dino"]["n_vectors"] == 20 * P and src["dino"]["peak_chunk_rows"] <= 100
    for s in src.values():
        assert 1 <= s["dims"]["0.95"] <= s["dims"]["0.99"] <= s["dim"]
        assert abs(sum(s["explained_variance_ratio"]) - 1) < 1e-9
    assert (tmp_path / "pca.png").stat().st_size > 5000
    assert json.loads((tmp_path / "pca.json").read_text())["sources"]["dino"]["dims"] == src["dino"]["dims"]


# ----------------------------------------------------------------------------- spatial redundancy
def test_similarity_by_distance_counts_and_decay(tmp_path):
    i, j, dist = pair_distances(SIDE)
    assert len(dist) == P * (P - 1) // 2 and (dist == 1).sum() == 2 * SIDE * (SIDE - 1)
    # features: Gaussian bumps around each grid position -> similarity falls with distance
    r_, c_ = np.divmod(np.arange(P), SIDE)
    d2 = (r_[:, None] - r_[None]) ** 2 + (c_[:, None] - c_[None]) ** 2
    base = np.exp(-d2 / 8.0)  # (P, P): feature of patch p = its bump over all positions
    rng = np.random.default_rng(0)
    feats = np.stack([base * rng.uniform(0.5, 2.0) for _ in range(6)]).astype(np.float32)
    store = make_store(tmp_path / "s", feats, [0] * 6)
    r = run_redundancy(RedundancyConfig(store, tmp_path / "out", n=5, bins=50, batch_size=2), progress=False)
    assert r["n_images"] == 5 and r["range_scaled_to_grid"] and r["max_distance"] == pytest.approx(10 * SIDE / 16)
    means = [m for m in r["mean"] if m is not None]
    assert all(a > b for a, b in zip(means, means[1:])) and all(-1 <= m <= 1 for m in means)
    k1 = int(np.searchsorted(r["edges"], 1.0, side="right") - 1)
    assert r["count"][k1] == 5 * 2 * SIDE * (SIDE - 1)
    unit = base / np.linalg.norm(base, axis=1, keepdims=True)  # per-image scale leaves cosines unchanged
    cos = (unit @ unit.T)[i, j]
    assert r["mean"][k1] == pytest.approx(cos[dist == 1].mean(), abs=1e-6)
    assert r["std"][k1] == pytest.approx(cos[dist == 1].std(), abs=1e-5)
    assert (tmp_path / "out" / "redundancy.png").stat().st_size > 5000
    assert "note" in json.loads((tmp_path / "out" / "redundancy.json").read_text())


def test_similarity_of_identical_patches_is_one():
    x = torch.randn(3, 1, 7).expand(3, 16, 7)  # every patch of an image identical
    r = similarity_by_distance([x], side=4, bins=10, max_distance=5.0)
    filled = [k for k, m in enumerate(r["mean"]) if m is not None]
    assert filled and all(abs(r["mean"][k] - 1) < 1e-6 and r["std"][k] < 1e-3 for k in filled)
    assert sum(r["count"]) == 3 * 16 * 15 // 2  # max distance 3*sqrt2 < 5: every pair counted


# ----------------------------------------------------------------------------- k-NN
def test_knn_matches_brute_force_vote():
    g = torch.Generator().manual_seed(0)
    tr, q = pooled_embedding(torch.randn(60, 3, 8, generator=g)), pooled_embedding(torch.randn(25, 3, 8, generator=g))
    ytr, yq = torch.randint(0, 4, (60,), generator=g), torch.randint(0, 4, (25,), generator=g)
    acc = knn_classify(tr, ytr, q, yq, ks=(5, 100), temperature=0.07, num_classes=4, chunk=7)
    for k in (5, 100):
        sim = (q @ tr.T).numpy()
        hits = 0
        for m in range(25):
            nn_ = np.argsort(-sim[m])[:min(k, 60)]
            votes = np.zeros(4)
            np.add.at(votes, ytr.numpy()[nn_], np.exp(sim[m, nn_] / 0.07))
            hits += int(votes.argmax() == yq[m])
        assert acc[k]["top1"] == pytest.approx(100 * hits / 25)
    assert acc[100]["top5"] == 100.0  # 4 classes: the true one is always among the top 5


def test_knn_separable_clusters(tmp_path):
    rng = np.random.default_rng(0)
    centers = rng.standard_normal((5, 16)) * 3
    y = np.repeat(np.arange(5), 40)
    lat = (centers[y][:, None, :] + 0.3 * rng.standard_normal((200, 4, 16))).astype(np.float32)  # (N, T=4, d=16)
    store = make_store(tmp_path / "lat", lat, y, kind="latents")
    r = run_knn(KNNConfig(store, tmp_path / "out", ks=(10, 20, 100), val_count=50), progress=False)
    assert r["n_val"] == 20 and r["n_train"] == 180 and r["classes"] == 5  # held out: a tenth of the store
    assert r["k"]["10"]["top1"] == 100.0 and r["k"]["20"]["top1"] == 100.0
    assert (tmp_path / "out" / "knn.png").stat().st_size > 5000
    shuffled = make_store(tmp_path / "lat2", lat, rng.permutation(y), kind="latents")  # labels carry no signal
    r = run_knn(KNNConfig(shuffled, tmp_path / "out2", ks=(10,), val_count=50), progress=False)
    assert r["k"]["10"]["top1"] < 70


# ----------------------------------------------------------------------------- noise robustness
def pixel_decoder_run(path: Path) -> Path:
    cfg = DecoderModelConfig(in_dim=C, num_patches=P, patch_size=PATCH, width=16, depth=1, heads=2, mlp_hidden=32)
    save_config(DecoderStageConfig(model=cfg), path / "config.yaml")
    save_checkpoint(path, "latest", PixelDecoder(cfg), PixelDecoder(cfg), {"step": 0})
    return path


def test_noise_sigma_zero_is_clean(toy, tmp_path):
    dec = pixel_decoder_run(tmp_path / "dec")
    r = run_noise(NoiseConfig(toy["vae"], toy["features"], tmp_path / "out", sigmas=(0.0, 0.5, 1.0), n=12, batch_size=5,
                              decoder=dec), progress=False)
    lat, feat = r["latent"], r["features_noise"]
    assert lat["cosine_vs_clean"][0] == pytest.approx(1.0, abs=1e-6) and lat["rel_l2_vs_clean"][0] < 1e-6
    assert feat["cosine_vs_clean"][0] == pytest.approx(1.0, abs=1e-6)
    assert lat["cosine_vs_clean"][2] < lat["cosine_vs_clean"][1] < 1.0
    assert feat["cosine_vs_clean"][2] < feat["cosine_vs_clean"][1] < 1.0
    assert lat["psnr_vs_clean"][0] == pytest.approx(100.0) and lat["psnr_vs_clean"][2] < 100.0
    assert 0 < lat["psnr_vs_image"][0] < 60  # the images are readable: PSNR against them too
    assert (tmp_path / "out" / "noise.png").stat().st_size > 5000


# ----------------------------------------------------------------------------- the CLI on the toy store
def test_cli_analyses_write_figures(toy, tmp_path):
    from typer.testing import CliRunner

    from flatdino_cli.cli import app
    from flatdino_cli.extract import extract_latents
    from flatdino_cli.runtime import CPU

    feats, vae = str(toy["features"]), str(toy["vae"])
    extract_latents(feats, vae, tmp_path / "lat", CPU, batch_size=16)
    runner = CliRunner()
    commands = {
        "ablate": (["ablate-tokens", "--vae", vae, "--features", feats, "--n", "6"], "token_ablation.png"),
        "pca": (["pca", "--features", feats, "--vae", vae, "--n", "6"], "pca.png"),
        "knn": (["knn", "--latents", str(tmp_path / "lat"), "--k", "3,5"], "knn.png"),
        "noise": (["noise", "--vae", vae, "--features", feats, "--n", "6", "--sigmas", "0,0.5"], "noise.png"),
        "redundancy": (["redundancy", "--features", feats, "--n", "6"], "redundancy.png"),
    }
    for name, (args, figure) in commands.items():
        out = tmp_path / name
        res = runner.invoke(app, [*args, "--out", str(out), "--device", "cpu"])
        assert res.exit_code == 0, f"{name}: {res.output}"
        assert (out / figure).stat().st_size > 5000, name
    # the four analyses on --n 6 images saw the same seeded subset, recorded in their JSON, and it is no
    # longer the store's first rows (rows are in class order: the first 6 are one class)
    subsets = [json.loads((tmp_path / name / f"{js}.json").read_text())["subset"] for name, js in
               (("ablate", "ablation"), ("pca", "pca"), ("noise", "noise"), ("redundancy", "redundancy"))]
    assert all(sub == subsets[0] for sub in subsets) and subsets[0]["seed"] == 0
    chosen = subsets[0]["rows"]
    store = Store.open(feats)
    assert len(chosen) == 6 and chosen == sorted(set(chosen)) and chosen != store.valid_indices()[:6].tolist()
    assert len({int(store.labels[r]) for r in chosen}) > 1
    res = runner.invoke(app, ["knn", "--latents", str(tmp_path / "lat"), "--k", "ten", "--out", str(tmp_path / "x")])
    assert res.exit_code == 1 and "--k" in res.output


def test_toy_judge_is_trained_once_then_loaded_from_the_cache(tmp_path, monkeypatch):
    from flatdino_cli.analysis import toy_classifier as J

    trained = []

    def fake_train(size, seed):  # stands in for the 30-s training run
        torch.manual_seed(seed)
        trained.append((size, seed))
        return J.ToyClassifier(), 0.5

    monkeypatch.setattr(J, "train_toy_classifier", fake_train)
    monkeypatch.setattr(J, "real_accuracy", lambda model, size, seed: 0.25)
    a, acc_a = J.cached_toy_classifier(16, 3, cache_dir=tmp_path)
    b, acc_b = J.cached_toy_classifier(16, 3, cache_dir=tmp_path)
    assert trained == [(16, 3)] and (acc_a, acc_b) == (0.5, 0.25)  # the second one was measured, not trained
    for k, v in a.state_dict().items():
        assert torch.equal(v, b.state_dict()[k]), k
    (f,) = (tmp_path / "flatdino").glob("toy-judge-v*-size16-seed3.safetensors")
    f.write_bytes(b"not a safetensors file")
    J.cached_toy_classifier(16, 3, cache_dir=tmp_path)
    assert trained == [(16, 3), (16, 3)]  # a damaged cache is retrained, never trusted


def test_measuring_commands_default_to_fp32():
    # one default for every command whose output is a measured number: bf16 only when asked
    import typer

    from flatdino_cli.cli import app

    commands = typer.main.get_command(app).commands
    for name in ("sample", "reconstruct", "ablate-tokens", "pca", "noise"):
        (precision,) = [p for p in commands[name].params if p.name == "precision"]
        assert precision.default == "fp32", name


# ----------------------------------------------------------------------------- noise: rFID and PSNR
@pytest.mark.usefixtures("one_thread")
def test_noise_reports_rfid_and_psnr_against_the_original_images(tmp_path):
    from flatdino_cli.fid_metrics import Gaussian, frechet_distance
    from flatdino_cli.data import adm_center_crop
    from flatdino_cli.extract import extract_features
    from flatdino_cli.metrics import psnr
    from flatdino_cli.viz import to_uint8

    val = mixed_val_folder(tmp_path / "val")
    feats = tmp_path / "feats"
    extract_features(val, feats, ExtractConfig(encoder="tiny", dtype="float32", batch_size=8), CPU)
    vae, dec = tiny_vae_run(feats, tmp_path / "vae"), tiny_decoder_run(tmp_path / "dec")

    class Pool:  # a cheap stand-in for Inception with the extractor interface: 3 pixel statistics
        name = "pool3"

        def __call__(self, images):
            x = images.reshape(len(images), -1, 3).astype(np.float32)
            return {"pool": np.concatenate([x.mean(1), x.std(1), np.median(x, 1)], 1)}

    r = run_noise(NoiseConfig(vae, feats, tmp_path / "out", sigmas=(0.0, 1.0), n=None, batch_size=2, decoder=dec),
                  progress=False, extractor=Pool())
    assert r["n_images"] == 5 and r["rfid_images"] == 5 and len(r["latent"]["rfid"]) == 2
    # sigma 0 on the latent path is the plain reconstruction: recompute its rFID and PSNR by hand
    from flatdino_cli.models.pixel_decoder import load_decoder

    store = Store.open(feats)
    _, model, _ = load_run(vae, "vae")
    pix = load_decoder(dec)
    x = torch.from_numpy(np.array(store.data, dtype=np.float32))
    with torch.no_grad():
        img = pix(model.decode(model.encode(x)[0])).clamp(0, 1)
    real = np.stack([np.asarray(adm_center_crop(load_rgb(p), 48)) for p in store.paths])
    g = lambda a: Gaussian.from_features(Pool()(a)["pool"].astype(np.float64))  # noqa: E731
    assert r["latent"]["rfid"][0] == pytest.approx(frechet_distance(g(to_uint8(img)), g(real)), rel=1e-6)
    real_t = torch.from_numpy(real).permute(0, 3, 1, 2).double() / 255
    assert r["latent"]["psnr_vs_image"][0] == pytest.approx(psnr(img, real_t).mean().item(), rel=1e-5)
    assert r["latent"]["rfid"][1] != r["latent"]["rfid"][0]  # the noise reaches the images
    assert "cosine_vs_clean" in r["latent"] and "rfid" in r["features_noise"]  # feature columns kept
    # without Inception weights anywhere: no rFID, and a note saying why
    old = os.environ.get("XDG_CACHE_HOME")
    os.environ["XDG_CACHE_HOME"] = str(tmp_path / "nowhere")  # the only place Inception is looked up
    try:
        r = run_noise(NoiseConfig(vae, feats, tmp_path / "out2", sigmas=(0.0,), n=2, decoder=dec), progress=False)
    finally:
        if old is None:
            os.environ.pop("XDG_CACHE_HOME")
        else:
            os.environ["XDG_CACHE_HOME"] = old
    assert "rfid" not in r["latent"] and "rfid omitted" in r["notes"][0]


def test_named_right_counts_in_all_and_per_label(monkeypatch):
    from flatdino_cli.analysis import toy_classifier as J

    monkeypatch.setattr(J, "predict", lambda model, images: np.array([0, 1, 1, 2, 2, 2]))
    acc, per_class = J.named_right(None, np.zeros((6, 4, 4, 3), np.uint8), np.array([0, 0, 1, 1, 2, 2]))
    assert acc == 4 / 6 and per_class == {0: 0.5, 1: 0.5, 2: 1.0}
