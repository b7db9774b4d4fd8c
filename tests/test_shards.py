import io
import json

import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image

from arsr.data import BadSample, ShardDataModule, collate, decode_rgb, pack_folder
from arsr.data.datamodule import CleanSamples
from arsr.components.degradations import BicubicDegradation

from conftest import png_bytes, rand_rgb


def _read_all(shards):
    ds = wds.WebDataset(shards, shardshuffle=False, empty_check=False)
    return list(ds)


def test_round_trip_same_pixels_and_metadata(tmp_path):
    src = tmp_path / "imgs"
    (src / "nested" / "negative").mkdir(parents=True)
    a, b, c = rand_rgb(40, 50, 1), rand_rgb(64, 48, 2), rand_rgb(33, 35, 3)
    Image.fromarray(a).save(src / "a.png")
    (src / "a.txt").write_text("a red thing\n")
    Image.fromarray(b).save(src / "nested" / "b.webp", lossless=True)
    Image.fromarray(c).save(src / "nested" / "negative" / "c.png")
    (tmp_path / "labels.csv").write_text("a.png,positive\n")
    report = pack_folder(src, tmp_path / "out", prefix="t", max_shard_count=2, labels_csv=tmp_path / "labels.csv", progress=False)
    assert report.written == 3 and len(report.shards) == 2 and not report.skipped
    samples = _read_all(report.shards)
    by_src = {json.loads(s["json"])["source"]: s for s in samples}
    assert set(by_src) == {"a.png", "nested/b.webp", "nested/negative/c.png"}
    for rel, arr in (("a.png", a), ("nested/b.webp", b), ("nested/negative/c.png", c)):
        field = next(k for k in by_src[rel] if k.startswith("hr."))
        back, conv = decode_rgb(by_src[rel][field])
        assert conv is None and np.array_equal(back, arr)
    meta = {k: json.loads(v["json"]) for k, v in by_src.items()}
    assert meta["a.png"]["caption"] == "a red thing" and meta["a.png"]["quality"] == "positive"
    assert meta["nested/negative/c.png"]["quality"] == "negative"
    assert meta["nested/b.webp"]["caption"] is None and meta["nested/b.webp"]["quality"] is None
    assert (meta["a.png"]["width"], meta["a.png"]["height"]) == (50, 40)


BAD = {
    "corrupt": (b"\x89PNG\r\n\x1a\n" + bytes(range(200)), "corrupt", None),
    "gray": (png_bytes(rand_rgb(40, 40)[..., 0]), None, "gray"),
    "rgba_opaque": (png_bytes(np.dstack([rand_rgb(40, 40), np.full((40, 40), 255, np.uint8)])), None, "alpha"),
    "rgba_transparent": (png_bytes(np.dstack([rand_rgb(40, 40), np.zeros((40, 40), np.uint8)])), "transparent", None),
    "sixteen_bit": (png_bytes((rand_rgb(40, 40)[..., 0].astype(np.uint16) * 257), mode="I;16"), None, "16bit"),
    "palette": (None, None, "palette"),
}


def _palette_png() -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rand_rgb(40, 40)).convert("P", palette=Image.ADAPTIVE, colors=16).save(buf, format="PNG")
    return buf.getvalue()


@pytest.mark.parametrize("name", sorted(BAD))
def test_decode_bad_samples(name):
    data, skip, conv = BAD[name]
    data = _palette_png() if name == "palette" else data
    if skip:
        with pytest.raises(BadSample) as e:
            decode_rgb(data)
        assert e.value.reason == skip
    else:
        arr, got = decode_rgb(data)
        assert got == conv and arr.dtype == np.uint8 and arr.shape == (40, 40, 3)


def test_sixteen_bit_scaled_not_clipped():
    v = np.full((8, 8), 65535, np.uint16)
    arr, _ = decode_rgb(png_bytes(v, mode="I;16"))
    assert arr.max() == 255 and arr.min() == 255


def _bad_shard(path):
    with wds.TarWriter(str(path)) as w:
        w.write({"__key__": "good", "hr.png": png_bytes(rand_rgb(48, 48)), "json": json.dumps({"caption": "ok", "quality": "negative"}).encode()})
        w.write({"__key__": "corrupt", "hr.png": BAD["corrupt"][0]})
        w.write({"__key__": "gray", "hr.png": BAD["gray"][0]})
        w.write({"__key__": "transparent", "hr.png": BAD["rgba_transparent"][0]})
        w.write({"__key__": "small", "hr.png": png_bytes(rand_rgb(16, 16))})
        w.write({"__key__": "noimage", "txt": b"hello"})
        w.write({"__key__": "palette", "hr.png": _palette_png()})
        w.write({"__key__": "badjson", "hr.png": png_bytes(rand_rgb(48, 48)), "json": b"{not json"})
        w.write({"__key__": "last", "hr.jpg": _jpeg(rand_rgb(40, 40))})


def _jpeg(arr) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def test_bad_samples_in_a_shard_are_skipped_and_counted(tmp_path):
    shard = tmp_path / "bad.tar"
    _bad_shard(shard)
    ds = wds.WebDataset(str(shard), shardshuffle=False, empty_check=False).compose(CleanSamples(32, "center", False, 0))
    out = list(ds)
    assert [s["key"] for s in out] == ["good", "gray", "palette", "last"]
    stats = collate(out)["stats"]
    assert stats == {"skipped_corrupt": 1, "converted_gray": 1, "skipped_transparent": 1, "skipped_too_small": 1,
                     "skipped_missing_image": 1, "converted_palette": 1, "skipped_bad_json": 1}
    assert out[0]["quality"] == 0 and out[0]["caption"] == "ok" and out[0]["hr"].shape == (3, 32, 32)


def test_pack_reports_skips(tmp_path):
    src = tmp_path / "imgs"
    src.mkdir()
    (src / "broken.png").write_bytes(BAD["corrupt"][0])
    (src / "gray.png").write_bytes(BAD["gray"][0])
    Image.fromarray(rand_rgb(10, 10)).save(src / "tiny.png")
    report = pack_folder(src, tmp_path / "out", min_size=20, progress=False)
    assert report.written == 1 and report.skipped == {"corrupt": 1, "too_small": 1} and report.converted == {"gray": 1}
    assert "corrupt=1" in str(report) and "written 1" in str(report)


def test_datamodule_batches_and_device_degradation(tmp_path):
    _bad_shard(tmp_path / "s-0.tar")
    dm = ShardDataModule(str(tmp_path / "s-0.tar"), BicubicDegradation(4), val_shards=str(tmp_path / "s-0.tar"),
                         crop_size=32, batch_size=2, num_workers=0, batches_per_epoch=3, shuffle_buffer=4)
    batches = list(dm.train_dataloader())
    assert len(batches) == 3
    b = dm.on_after_batch_transfer(batches[0], 0)
    assert b["hr"].shape == (2, 3, 32, 32) and b["lr"].shape == (2, 3, 8, 8) and b["lr_up"].shape == (2, 3, 32, 32)
    assert b["hr"].dtype == torch.float32 and 0 <= b["hr"].min() and b["hr"].max() <= 1
    val = list(dm.val_dataloader())
    assert sum(len(v["key"]) for v in val) == 4
    assert [k for v in val for k in v["key"]] == ["good", "gray", "palette", "last"]


def test_missing_shard_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="shard.*not found.*make_shards"):
        ShardDataModule(str(tmp_path / "nope-{0..3}.tar"), BicubicDegradation(4), crop_size=32)


def test_crop_size_must_fit_scale(tmp_path):
    _bad_shard(tmp_path / "s.tar")
    with pytest.raises(ValueError, match="not divisible"):
        ShardDataModule(str(tmp_path / "s.tar"), BicubicDegradation(4), crop_size=30)


def test_pair_pool_fills_then_swaps():
    from arsr.data.pool import PairPool

    pool = PairPool(6)
    batches = [{"hr": torch.full((2, 1), float(i)), "key": [f"{i}a", f"{i}b"], "stats": {"x": i}} for i in range(6)]
    g = torch.Generator().manual_seed(0)
    outs = [pool(b, g) for b in batches]
    assert all(o is b for o, b in zip(outs[:3], batches[:3]))  # filling: passed through
    seen = [v for o in outs[3:] for v in o["hr"].flatten().tolist()]
    assert len(seen) == 6 and seen != [3.0, 3.0, 4.0, 4.0, 5.0, 5.0]  # mixed across batches
    for o in outs[3:]:  # tensors and lists stay paired
        assert [k[0] for k in o["key"]] == [str(int(v)) for v in o["hr"].flatten().tolist()]
    # every pair is accounted for: what came out plus what the pool holds is every pair put in
    held = pool.store["hr"].flatten().tolist()
    assert sorted(seen + held) == sorted(v for b in batches for v in b["hr"].flatten().tolist())
    with pytest.raises(ValueError, match="multiple of the batch size"):
        PairPool(5)(batches[0])


def _mixed_folder(src, n=10):
    (src / "sub").mkdir(parents=True)
    for i in range(n):
        Image.fromarray(rand_rgb(24 + i, 30, i)).save(src / ("sub" if i % 3 else ".") / f"{i}.png")
    (src / "broken.png").write_bytes(BAD["corrupt"][0])
    (src / "gray.png").write_bytes(BAD["gray"][0])
    return src


def test_workers_write_the_same_shards(tmp_path):
    """--workers 2 gives the same shard bytes (hence samples, keys, order, index) as --workers 1."""
    import importlib.util

    from conftest import ROOT

    src = _mixed_folder(tmp_path / "src")
    spec = importlib.util.spec_from_file_location("make_shards", ROOT / "tools" / "make_shards.py")
    make_shards = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(make_shards)
    outs = {}
    for w in (1, 2):
        assert make_shards.main(["--src", str(src), "--out_dir", str(tmp_path / f"w{w}"), "--prefix", "t",
                                 "--max_shard_count", "4", "--workers", str(w), "--progress", "false"]) == 0
        outs[w] = sorted(p.name for p in (tmp_path / f"w{w}").iterdir())
    assert outs[1] == outs[2] == ["t-000000.tar", "t-000001.tar", "t-000002.tar", "t-shardindex.json"]
    for name in outs[1]:
        assert (tmp_path / "w1" / name).read_bytes() == (tmp_path / "w2" / name).read_bytes(), name
    samples = _read_all([str(tmp_path / "w2" / n) for n in outs[2][:3]])
    assert [s["__key__"] for s in samples] == [f"{k:08d}" for k in range(11)]  # 10 + gray (converted), broken skipped


def test_val_fraction_splits_by_path_hash(tmp_path):
    from arsr.data.shards import in_val_split

    src = _mixed_folder(tmp_path / "src", n=30)
    report = pack_folder(src, tmp_path / "out", prefix="train", val_fraction=0.3, workers=2, progress=False)
    assert report.written + report.val_written == 31 and 0 < report.val_written < 31 and "validation samples" in str(report)
    train = {json.loads(s["json"])["source"] for s in _read_all(report.shards)}
    val = {json.loads(s["json"])["source"] for s in _read_all(report.val_shards)}
    assert not train & val and val == {s for s in train | val if in_val_split(s, 0.3)}
    assert report.val_shards == [str(tmp_path / "out" / "val-000000.tar")] and (tmp_path / "out" / "val-shardindex.json").is_file()
    again = pack_folder(src, tmp_path / "again", prefix="train", val_fraction=0.3, progress=False)  # 1 worker: same split
    assert {json.loads(s["json"])["source"] for s in _read_all(again.val_shards)} == val
    with pytest.raises(ValueError, match="val_fraction"):
        pack_folder(src, tmp_path / "x", val_fraction=1.0, progress=False)
