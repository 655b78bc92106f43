"""Image sources, robust loading, preprocessing, and the resumable feature/latent store."""

import hashlib
import io
import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from flatdino_cli.data import (BadImage, BadImageWarning, EncoderTransform, FeatureDataset, ImageDataset, Store,
                               adm_center_crop, collate_images, denormalize, encoder_input, list_images, load_rgb,
                               random_resized_crop_flip, split_indices)
from flatdino_cli.errors import UserError

REPO = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------- awkward images
@pytest.fixture
def messy(tmp_path) -> Path:
    d = tmp_path / "messy"
    d.mkdir()
    Image.new("RGB", (40, 30), (10, 200, 30)).save(d / "good.jpg", quality=95)
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(buf, "JPEG")
    (d / "trunc.jpg").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    (d / "notes.txt").write_text("not an image")
    Image.new("CMYK", (20, 20), (0, 0, 0, 0)).save(d / "cmyk.jpg")
    ramp = np.tile((np.arange(32, dtype=np.uint16) * 2114), (8, 1))  # 0 .. 65534
    ramp[0, 0] = 128 * 257
    Image.fromarray(ramp).save(d / "gray16.png")
    Image.new("RGB", (1, 1), (255, 0, 0)).save(d / "one.png")
    rgba = np.zeros((10, 10, 4), np.uint8)
    rgba[:5] = (0, 0, 255, 255)  # top half opaque blue, bottom half transparent (stored black)
    Image.fromarray(rgba, "RGBA").save(d / "rgba.png")
    pal = Image.new("P", (10, 10), 0)
    pal.putpalette([0, 0, 0, 0, 255, 0] + [0] * 762)
    pal.paste(1, (0, 0, 10, 5))  # top half green, bottom half index 0 = transparent
    pal.save(d / "pal.png", transparency=0)
    exif_img = Image.new("RGB", (30, 20), (255, 255, 255))
    exif_img.paste((255, 0, 0), (0, 0, 6, 6))  # marker at the stored top-left
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to display
    exif_img.save(d / "exif.jpg", exif=exif, quality=95)
    return d


def test_load_rgb_modes(messy):
    assert load_rgb(messy / "good.jpg").mode == "RGB"
    assert np.asarray(load_rgb(messy / "cmyk.jpg")).min() > 240  # CMYK (0,0,0,0) is white
    g = np.asarray(load_rgb(messy / "gray16.png"))
    assert g.shape == (8, 32, 3) and g[0, 0, 0] == 128  # scaled by 1/257, not clipped to 255
    assert g[1, -1, 0] == 255 and g[1, 1, 0] == round(2114 / 257)
    a = np.asarray(load_rgb(messy / "rgba.png"))
    assert tuple(a[0, 0]) == (0, 0, 255) and tuple(a[-1, 0]) == (255, 255, 255)  # alpha on white
    p = np.asarray(load_rgb(messy / "pal.png"))
    assert tuple(p[0, 0]) == (0, 255, 0) and tuple(p[-1, 0]) == (255, 255, 255)
    e = load_rgb(messy / "exif.jpg")
    assert e.size == (20, 30)  # upright: width and height swapped
    e = np.asarray(e).astype(int)
    assert e[1, -2, 0] > 200 and e[1, -2, 1] < 60  # marker now at the top-right
    assert e[1, 1].min() > 200  # and no longer at the top-left
    with pytest.raises(BadImage, match="trunc.jpg"):
        load_rgb(messy / "trunc.jpg")
    with pytest.raises(BadImage, match="notes.txt"):
        load_rgb(messy / "notes.txt")


def test_dataset_skips_bad_images(messy):
    images = list_images(messy)
    names = [Path(p).name for p in images.paths]
    assert names == sorted(names) and "notes.txt" not in names and len(names) == 8
    assert set(images.labels) == {-1}
    ds = ImageDataset(images, EncoderTransform(crop_size=16, input_size=16, interp="bilinear"))
    with pytest.warns(BadImageWarning, match="trunc.jpg"):
        items = [ds[i] for i in range(len(ds))]
    bad = names.index("trunc.jpg")
    for i, x, label in items:
        if i == bad:
            assert x is None
            continue
        assert x.shape == (3, 16, 16) and x.dtype == torch.float32 and torch.isfinite(x).all(), names[i]
        px = denormalize(x)
        assert px.min() > -0.05 and px.max() < 1.05
    one = denormalize(items[names.index("one.png")][1])  # 1x1 red -> a 16x16 red square
    assert torch.allclose(one, torch.tensor([1.0, 0, 0]).view(3, 1, 1).expand(3, 16, 16), atol=1e-3)

    batch = collate_images(items)
    assert batch.images.shape == (7, 3, 16, 16) and batch.skipped.tolist() == [bad]
    assert bad not in batch.indices.tolist() and len(batch.labels) == 7
    assert collate_images([items[bad]]).images is None

    strict = ImageDataset(images, EncoderTransform(16, 16), strict=True)
    with pytest.raises(BadImage, match="trunc.jpg"):
        strict[bad]
    assert issubclass(BadImage, UserError)  # the CLI turns strict-mode failures into one line


def test_adm_center_crop_and_encoder_input():
    img = Image.new("RGB", (600, 200))
    for k, colour in enumerate([(255, 0, 0), (0, 255, 0), (0, 0, 255)]):
        img.paste(colour, (200 * k, 0, 200 * (k + 1), 200))
    out = adm_center_crop(img, 64)  # BOX-halves once (200 >= 128), then bicubic to 64 high
    assert out.size == (64, 64)
    assert np.abs(np.asarray(out)[:, 2:-2].astype(int) - (0, 255, 0)).max() <= 2  # the centre third
    assert adm_center_crop(Image.new("RGB", (1, 1)), 48).size == (48, 48)
    small = Image.new("RGB", (48, 48), (9, 99, 199))
    assert adm_center_crop(small, 48).tobytes() == small.tobytes()  # toy data: a no-op

    x = encoder_input(img, crop_size=64, input_size=56, interp="bicubic")
    y = encoder_input(img, crop_size=64, input_size=56, interp="bilinear")
    assert x.shape == y.shape == (3, 56, 56)
    assert torch.allclose(denormalize(x)[:, 28, 28], torch.tensor([0.0, 1.0, 0.0]), atol=0.02)
    noise = Image.fromarray(np.random.default_rng(1).integers(0, 255, (64, 64, 3), dtype=np.uint8))
    assert not torch.equal(encoder_input(noise, 64, 56, "bicubic"), encoder_input(noise, 64, 56, "bilinear"))

    # extract's split: uint8 crops in the loader, finished a batch at a time == the per-image transform
    tf = EncoderTransform(64, 56, "bicubic")
    crops = [tf.pixels(im) for im in (img, noise, small)]
    assert all(c.dtype == torch.uint8 and c.shape == (3, 64, 64) for c in crops)
    assert torch.equal(tf.finish(torch.stack(crops)), torch.stack([tf(im) for im in (img, noise, small)]))
    assert torch.equal(tf(img), x)


def test_random_resized_crop_flip():
    img = Image.fromarray(np.random.default_rng(0).integers(0, 255, (50, 70, 3), dtype=np.uint8))
    a = random_resized_crop_flip(img, 32, generator=torch.Generator().manual_seed(3))
    b = random_resized_crop_flip(img, 32, generator=torch.Generator().manual_seed(3))
    assert a.size == (32, 32) and a.tobytes() == b.tobytes()
    outs = {random_resized_crop_flip(img, 32, generator=torch.Generator().manual_seed(s)).tobytes() for s in range(6)}
    assert len(outs) == 6
    x = EncoderTransform(crop_size=32, input_size=28, interp="bilinear", augment=True)(img)
    assert x.shape == (3, 28, 28)


# ----------------------------------------------------------------------------- sources
def _touch_png(p: Path) -> None:
    p.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (4, 4)).save(p, format="PNG")


def test_imagefolder_and_class_index(tmp_path):
    root = tmp_path / "train"
    for syn in ("n02", "n01"):
        _touch_png(root / syn / "b.png")
        _touch_png(root / syn / "a.JPEG".replace("JPEG", "PNG"))  # upper-case extension counts
    _touch_png(root / "n02" / "deeper" / "c.png")
    (root / "n01" / "README.txt").write_text("ignored")
    il = list_images(root)
    assert il.class_names == ["n01", "n02"]
    assert [Path(p).relative_to(root).as_posix() for p in il.paths] == \
        ["n01/a.PNG", "n01/b.png", "n02/a.PNG", "n02/b.png", "n02/deeper/c.png"]
    assert il.labels == [0, 0, 1, 1, 1]

    (tmp_path / "syn.txt").write_text("n00 zero thing\nn01 tench, Tinca tinca\n\nn02 goldfish\n")
    il = list_images(root, class_index=tmp_path / "syn.txt")
    assert il.labels == [1, 1, 2, 2, 2] and il.class_names == ["n00", "n01", "n02"]
    (tmp_path / "idx.json").write_text(json.dumps({"n01": 5, "n02": 7}))
    assert list_images(root, class_index=tmp_path / "idx.json").labels == [5, 5, 7, 7, 7]
    (tmp_path / "keras.json").write_text(json.dumps({"3": ["n01", "tench"], "4": ["n02", "goldfish"]}))
    assert list_images(root, class_index=tmp_path / "keras.json").labels == [3, 3, 4, 4, 4]
    (tmp_path / "partial.json").write_text(json.dumps({"n01": 0}))
    with pytest.raises(UserError, match="n02"):
        list_images(root, class_index=tmp_path / "partial.json")
    with pytest.raises(UserError, match="nowhere"):
        list_images(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no images"):
        list_images(tmp_path / "empty")
    assert list_images(root / "n01" / "b.png").paths == [str((root / "n01" / "b.png").resolve())]


def test_path_label_list(tmp_path):
    _touch_png(tmp_path / "data" / "sub" / "x.png")
    _touch_png(tmp_path / "data" / "y z.png")
    _touch_png(tmp_path / "elsewhere" / "w.png")
    lst = tmp_path / "data" / "list.txt"
    lst.write_text(f"# comment\nsub/x.png 3\n\ny z.png\n{tmp_path / 'elsewhere' / 'w.png'} 0\nsub/x.png n01\n")
    il = list_images(lst, class_index=None)
    assert il.paths == [str(tmp_path / "data" / "sub" / "x.png"), str(tmp_path / "data" / "y z.png"),
                        str(tmp_path / "elsewhere" / "w.png"), str(tmp_path / "data" / "sub" / "x.png n01")]
    assert il.labels == [3, -1, 0, -1] and il.class_names == ["0", "1", "2", "3"]
    (tmp_path / "syn.txt").write_text("n00 a\nn01 b\n")
    assert list_images(lst, class_index=tmp_path / "syn.txt").labels == [3, -1, 0, 1]
    assert list_images(lst).source_hash() != list_images(lst, class_index=tmp_path / "syn.txt").source_hash()


def test_symlink_loop_and_newline_names_add_no_rows(tmp_path):
    from flatdino_cli.data import list_images
    from flatdino_cli.toydata import write_toy_dataset

    write_toy_dataset(tmp_path / "toy", per_class=2, size=48, seed=0)
    cls = sorted((tmp_path / "toy").iterdir())[0]
    n = len(list_images(tmp_path / "toy"))
    (cls / "loop").symlink_to(cls)  # a loop
    (cls / "again").symlink_to(tmp_path / "toy")  # the whole tree once more
    first = sorted(cls.glob("*.png"))[0]
    (cls / "bad\nname.png").write_bytes(first.read_bytes())
    with pytest.warns(UserWarning) as record:
        images = list_images(tmp_path / "toy")
    assert len(images) == n
    for path, label in zip(images.paths, images.labels):  # every image under its own class, once
        rel = Path(path).relative_to((tmp_path / "toy").resolve())
        assert len(rel.parts) == 2 and rel.parts[0] == images.class_names[label], rel
    text = " ".join(str(w.message) for w in record)
    assert "symlinks" in text and "bad\\nname.png" in text


# ----------------------------------------------------------------------------- the store
SHAPE = (4, 3)
N = 10


def _row(i: int) -> np.ndarray:  # a row's value depends only on its index (as an encoder output would)
    return np.sin(np.arange(12, dtype=np.float32) * 0.37 + i).reshape(SHAPE) * (i + 1)


def _make(path, overwrite=False, identity=None, **kw):
    return Store.create(path, "features", SHAPE, N, kw.pop("dtype", "float16"),
                        identity=identity or {"encoder": "tiny", "weights_sha256": "abc"},
                        preprocessing={"crop_size": 48, "input_size": 48, "interp": "bicubic"},
                        paths=[f"/img/{i}.png" for i in range(N)], labels=[i % 3 for i in range(N)],
                        extra={"note": "test"}, overwrite=overwrite, **kw)


def _fill(store, rows, skipped=()):
    rows = [r for r in rows if r not in skipped]
    store.write_rows(rows, np.stack([_row(i) for i in rows]))
    store.mark_done(rows)


def _digest(d: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(d.iterdir())}


def test_store_roundtrip_and_resume(tmp_path):
    ref = _make(tmp_path / "ref")
    _fill(ref, range(0, 4))
    _fill(ref, range(4, N), skipped=(6,))
    ref.finalize(skipped=[6])

    s = _make(tmp_path / "s")
    _fill(s, [5, 1, 3])  # any order
    assert s.pending().tolist() == [0, 2, 4, 6, 7, 8, 9]
    del s  # "killed"; rerun resumes
    s = _make(tmp_path / "s")
    assert s.pending().tolist() == [0, 2, 4, 6, 7, 8, 9]
    _fill(s, s.pending().tolist(), skipped=(6,))
    s.finalize(skipped=[6])
    assert _digest(tmp_path / "s") == _digest(tmp_path / "ref")  # byte-identical to the straight run

    st = Store.open(tmp_path / "s", expect_kind="features")
    assert st.data.shape == (N, *SHAPE) and st.data.dtype == np.float16 and st.count == N
    assert st.item_shape == SHAPE and st.paths[2] == "/img/2.png" and st.labels.tolist() == [i % 3 for i in range(N)]
    np.testing.assert_allclose(st.data[3], _row(3), rtol=1e-3)
    assert not st.data[6].any()  # skipped: zeros, flagged, listed
    assert st.manifest["skipped"] == [{"index": 6, "path": "/img/6.png"}] and st.manifest["skipped_count"] == 1
    assert st.manifest["complete"] and st.manifest["extra"] == {"note": "test"}
    assert st.manifest_hash() == ref.manifest_hash() and len(st.manifest_hash()) == 64

    # FeatureDataset leaves the skipped row out; split_indices is deterministic and disjoint
    fd = FeatureDataset(st)
    assert len(fd) == N - 1 and 6 not in fd.indices.tolist()
    x, y = fd[3]
    assert x.dtype == torch.float32 and x.shape == SHAPE and y == fd.labels[3]
    tr, va = split_indices(N, 3, seed=1)
    assert len(va) == 3 and sorted(tr.tolist() + va.tolist()) == list(range(N))
    assert np.array_equal(va, split_indices(N, 3, seed=1)[1]) and not np.array_equal(va, split_indices(N, 3, seed=2)[1])
    assert len(FeatureDataset(st, indices=va)) == 3 - int(6 in va.tolist())
    with pytest.raises(UserError):
        split_indices(N, N, 0)

    # rerunning a finished extract finds nothing to do and leaves the bytes alone
    again = _make(tmp_path / "s")
    assert len(again.pending()) == 0
    again.finalize()
    assert _digest(tmp_path / "s") == _digest(tmp_path / "ref")


def test_store_refuses_mismatch_and_overwrites(tmp_path):
    s = _make(tmp_path / "s")
    _fill(s, range(3))
    with pytest.raises(UserError, match=r"identity\.weights_sha256.*--overwrite"):
        _make(tmp_path / "s", identity={"encoder": "tiny", "weights_sha256": "zzz"})
    with pytest.raises(UserError, match="dtype"):
        _make(tmp_path / "s", dtype="float32")
    (tmp_path / "s" / "keep.txt").write_text("not ours")
    s2 = _make(tmp_path / "s", overwrite=True, identity={"encoder": "tiny", "weights_sha256": "zzz"})
    assert len(s2.pending()) == N and (tmp_path / "s" / "keep.txt").exists()
    assert s2.manifest["identity"]["weights_sha256"] == "zzz"


def test_store_open_errors(tmp_path):
    with pytest.raises(UserError, match="no manifest"):
        Store.open(tmp_path / "missing")
    s = _make(tmp_path / "s")
    _fill(s, range(4))
    with pytest.raises(UserError, match=r"incomplete.*4 of 10"):
        Store.open(tmp_path / "s")
    _fill(s, range(4, N))
    with pytest.raises(RuntimeError):
        _make(tmp_path / "t").finalize()  # rows pending
    s.finalize()
    with pytest.raises(UserError, match="expected latents"):
        Store.open(tmp_path / "s", expect_kind="latents")
    with pytest.raises(RuntimeError):
        Store.open(tmp_path / "s").write_rows([0], _row(0)[None])
    with pytest.raises(ValueError, match="non-finite"):
        s.write_rows([0], np.full((1, *SHAPE), 1e6))  # float16 overflow is refused, not stored as inf
    m = json.loads((tmp_path / "s" / "manifest.json").read_text())
    m["format_version"] = 99
    (tmp_path / "s" / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(UserError, match="format version"):
        Store.open(tmp_path / "s")


def test_manifest_write_is_atomic(tmp_path, monkeypatch):
    s = _make(tmp_path / "s")
    _fill(s, range(N))
    before = (tmp_path / "s" / "manifest.json").read_bytes()

    def boom(*a, **k):
        raise OSError("disk on fire")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError):
        s.finalize()
    monkeypatch.undo()
    assert (tmp_path / "s" / "manifest.json").read_bytes() == before  # old manifest intact
    assert sorted(p.name for p in (tmp_path / "s").iterdir()) == ["data.npy", "done.npy", "labels.npy",
                                                                    "manifest.json", "paths.txt"]
    s.finalize()
    assert Store.open(tmp_path / "s").manifest["complete"]


def test_store_survives_sigkill(tmp_path):
    """A writer killed with SIGKILL mid-run, then resumed, ends byte-identical to a straight run."""
    ref = _make(tmp_path / "ref")
    for a in range(0, N, 2):
        _fill(ref, range(a, a + 2))
    ref.finalize()

    child = textwrap.dedent(f"""
        import sys, time
        sys.path.insert(0, {str(REPO)!r}); sys.path.insert(0, {str(Path(__file__).parent)!r})
        from test_data import _make, _fill, N
        s = _make({str(tmp_path / "s")!r})
        for a in s.pending()[::2].tolist():
            _fill(s, range(a, a + 2))
            print(a, flush=True)
            time.sleep(1.0)  # the parent kills during this pause (kill -9 never waits for a flush)
        time.sleep(60)
    """)
    proc = subprocess.Popen([sys.executable, "-c", child], stdout=subprocess.PIPE, text=True)
    try:
        for _ in range(2):  # two batches done, then kill without warning
            assert proc.stdout.readline().strip() != ""
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    s = _make(tmp_path / "s")
    left = s.pending().tolist()
    assert 0 < len(left) <= N - 4 and left == list(range(N - len(left), N))
    for a in range(left[0], N, 2):
        _fill(s, range(a, a + 2))
    s.finalize()
    assert _digest(tmp_path / "s") == _digest(tmp_path / "ref")
