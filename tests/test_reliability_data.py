"""Bad data never stops or silently shrinks a run: bombs, json types, truncated tars, EXIF,
nothing usable (stops with a message), evaluation without repeats."""

import io
import json
import struct
import zlib

import numpy as np
import pytest
import webdataset as wds
from PIL import Image

from arsr.components.degradations import BicubicDegradation
from arsr.data import BadSample, ShardDataModule, decode_rgb, pack_folder
from arsr.data.datamodule import CleanSamples, collate
from arsr.data.stream import NoUsableSamples

from conftest import png_bytes, rand_rgb, exif_rotated_jpeg


def bomb_png(w: int = 100_000, h: int = 100_000) -> bytes:
    """A tiny PNG declaring a huge size (PIL's decompression-bomb limit is ~89 Mpx)."""
    chunk = lambda t, d: struct.pack(">I", len(d)) + t + d + struct.pack(">I", zlib.crc32(t + d))
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)) + \
        chunk(b"IDAT", zlib.compress(b"\0" * 16)) + chunk(b"IEND", b"")


def cmyk_jpeg() -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rand_rgb(40, 40)).convert("CMYK").save(buf, format="JPEG")
    return buf.getvalue()


@pytest.mark.parametrize("data, reason", [(bomb_png(), "decompression_bomb"), (bomb_png(10_000, 10_000), "decompression_bomb"),
                                          (png_bytes(rand_rgb(40, 40))[:200], "corrupt")])
def test_guarded_decode_skips_with_a_reason(data, reason):
    with pytest.raises(BadSample) as e:
        decode_rgb(data)
    assert e.value.reason == reason and ("exceeds limit" in str(e.value) if reason == "decompression_bomb" else True)


def test_exif_orientation_and_cmyk():
    arr, conv = decode_rgb(exif_rotated_jpeg(rand_rgb(20, 40)))  # stored 40 wide x 20 high
    assert arr.shape == (40, 20, 3) and conv is None  # displayed upright: 20 wide x 40 high
    arr, conv = decode_rgb(cmyk_jpeg())
    assert arr.shape == (40, 40, 3) and conv == "cmyk"


def test_make_shards_skips_a_bomb_and_writes_an_index(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "bomb.png").write_bytes(bomb_png())
    Image.fromarray(rand_rgb(40, 40)).save(src / "ok.png")
    (src / "rotated.jpg").write_bytes(exif_rotated_jpeg(rand_rgb(20, 40)))
    report = pack_folder(src, tmp_path / "out", prefix="t", progress=False)
    assert report.written == 2 and report.skipped == {"decompression_bomb": 1}
    assert "decompression_bomb=1" in str(report)
    index = json.loads((tmp_path / "out" / "t-shardindex.json").read_text())
    assert index["shardlist"] == [{"url": "t-000000.tar", "nsamples": 2}]
    meta = {json.loads(s["json"])["source"]: json.loads(s["json"]) for s in wds.WebDataset(report.shards, shardshuffle=False, empty_check=False)}
    assert (meta["rotated.jpg"]["width"], meta["rotated.jpg"]["height"]) == (20, 40)


def _shard(path, samples):
    with wds.TarWriter(str(path)) as w:
        for s in samples:
            w.write(s)


def test_json_fields_are_type_checked(tmp_path):
    img = png_bytes(rand_rgb(40, 40))
    metas = {"null_caption": {"caption": None}, "list_caption": {"caption": ["", "second"]}, "int_caption": {"caption": 3},
             "list_json": [1, 2], "bad_quality": {"quality": 5}, "ok": {"caption": "c", "quality": "positive"}}
    _shard(tmp_path / "s.tar", [{"__key__": k, "hr.png": img, "json": json.dumps(m).encode()} for k, m in metas.items()])
    out = list(wds.WebDataset(str(tmp_path / "s.tar"), shardshuffle=False, empty_check=False).compose(CleanSamples(32, "center", False, 0)))
    got = {s["key"]: (s["caption"], s["quality"]) for s in out}
    assert got == {"null_caption": ("", -1), "list_caption": ("second", -1), "ok": ("c", 1)}
    assert collate(out)["stats"] == {"skipped_bad_json": 3}


def test_truncated_shard_counts_lost_samples(tmp_path, capsys):
    src = tmp_path / "src"
    src.mkdir()
    for i in range(6):
        Image.fromarray(rand_rgb(40, 40, i)).save(src / f"{i}.png")
    report = pack_folder(src, tmp_path / "out", prefix="t", progress=False)
    shard = tmp_path / "out" / "t-000000.tar"
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    dm = ShardDataModule(report.shards, BicubicDegradation(4), crop_size=32, batch_size=1, num_workers=0, batches_per_epoch=6, shuffle_buffer=1)
    batches = list(dm.train_dataloader())
    stats = {k: v for b in batches for k, v in b["stats"].items()}
    assert stats["truncated_shard"] >= 1 and stats["lost_in_truncated_shards"] >= 1
    err = capsys.readouterr().err
    assert f"shard {shard} is unreadable after" in err and "sample(s) lost (its index lists 6)" in err


@pytest.mark.parametrize("case", ["all_unreadable", "crop_too_big"])
def test_nothing_usable_stops_with_a_message(tmp_path, case):
    if case == "all_unreadable":
        for i in range(3):
            (tmp_path / f"s-{i}.tar").write_bytes(b"not a tar at all" * 10)
        crop, n, match = 32, 3, r"no usable training sample in 0 sample\(s\) from 3 shard\(s\) \(skipped_unreadable_shard=\d+\); the shards hold no readable samples"
    else:
        for i in range(2):
            _shard(tmp_path / f"s-{i}.tar", [{"__key__": f"{i}{k}", "hr.png": png_bytes(rand_rgb(40, 40, k))} for k in range(3)])
        crop, n, match = 64, 2, r"no usable training sample in \d+ sample\(s\) from 2 shard\(s\) .*crop_size is larger than the images \(too_small: 40x40 < crop 64\)"
    dm = ShardDataModule(str(tmp_path / f"s-{{0..{n - 1}}}.tar"), BicubicDegradation(4),
                         crop_size=crop, batch_size=2, num_workers=0, batches_per_epoch=2)
    with pytest.raises(NoUsableSamples, match=match):
        next(iter(dm.train_dataloader()))


def test_evaluation_never_repeats_samples(tmp_path):
    _shard(tmp_path / "v.tar", [{"__key__": f"k{i}", "hr.png": png_bytes(rand_rgb(40, 40, i))} for i in range(3)])
    dm = ShardDataModule(str(tmp_path / "v.tar"), BicubicDegradation(4), val_shards=str(tmp_path / "v.tar"), crop_size=32,
                         batch_size=8, num_workers=0)
    keys = [k for b in dm.test_dataloader() for k in b["key"]]
    assert keys == ["k0", "k1", "k2"]  # a batch of 8 over 3 samples: one partial batch, nothing repeated
