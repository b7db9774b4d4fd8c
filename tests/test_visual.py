"""arsr.visual: LR | scales | HR grids in TensorBoard, Y metrics named as arsr test names them."""

import torch
from lightning.pytorch.loggers import TensorBoardLogger

from arsr.metrics import psnr, ssim
from arsr.visual import log_sr_grid, sr_grid, sr_metrics


class _Module:  # what log_sr_grid reads of a LightningModule
    global_rank, global_step = 0, 7

    def __init__(self, logger):
        self.logger = logger


def test_grid_layout_logging_and_metric_names(tmp_path):
    hr = torch.rand(3, 3, 32, 32)
    lr = torch.nn.functional.interpolate(hr, scale_factor=0.25, mode="area")
    outs = [torch.rand(3, 3, 8, 8), torch.rand(3, 3, 16, 16), hr.clone()]
    g = sr_grid(lr, outs, hr, n=2)
    assert g.shape == (3, 14 + 2 * 34 + 2, 5 * 34 + 2)  # title row + 2 samples, LR | 3 outputs | HR
    assert torch.equal(g[:, 14 + 2 : 14 + 34, -34:-2], hr[0]) and torch.equal(g[:, 16:48, 2:34], torch.nn.functional.interpolate(lr, size=32)[0])
    tb = TensorBoardLogger(tmp_path, name="tb")
    log_sr_grid(_Module(tb), "val/lr_scales_hr", lr, outs, hr, n=2)
    tb.experiment.flush()  # the writer's queue is written asynchronously
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tmp_path / "tb" / "version_0"), size_guidance={"images": 0}).Reload()
    assert acc.Images("val/lr_scales_hr")[0].step == 7
    log_sr_grid(_Module(None), "x", lr, outs, hr)  # no logger: nothing, no error

    m = sr_metrics(outs, hr, lr, "val")
    assert set(m) == {"val/psnr_y_x1", "val/psnr_y_x2", "val/ssim_y_x2", "val/psnr_y", "val/ssim_y"}  # 8 px at x1: no SSIM window
    assert m["val/psnr_y"] == psnr(hr, hr, 4).mean() and m["val/ssim_y"] == ssim(hr, hr, 4).mean()
