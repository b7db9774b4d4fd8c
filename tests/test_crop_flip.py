"""Horizontal flip applies with every crop mode (VARSR flips its resize_center crops)."""

import random

import numpy as np
import pytest

from arsr.data.datamodule import crop_hr


@pytest.mark.parametrize("mode", ["random", "center", "resize_center"])
def test_hflip_with_every_crop_mode(mode):
    arr = np.random.default_rng(0).integers(0, 256, (80, 96, 3), dtype=np.uint8)
    plain = [crop_hr(arr, 32, mode, random.Random(s), hflip=False) for s in range(16)]
    flipped = [crop_hr(arr, 32, mode, random.Random(s), hflip=True) for s in range(16)]
    n = sum(not np.array_equal(f, p) for f, p in zip(flipped, plain))
    assert 0 < n < 16
    assert all(np.array_equal(f, p) or np.array_equal(f, p[:, ::-1]) for f, p in zip(flipped, plain))
