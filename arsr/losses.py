"""Perceptual loss with weights from a local file only (never a download)."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor, nn
from torchmetrics.functional.image.lpips import _LPIPS


class LPIPS(nn.Module):
    """LPIPS-VGG distance; inputs in [-1, 1].

    The linear heads ship inside torchmetrics. The VGG16 backbone comes from
    ``backbone_weights`` (torchvision's ``vgg16-397923af.pth``, keys ``features.N.*``);
    with None the backbone stays randomly initialised, which only makes sense in tests.
    """

    def __init__(self, backbone_weights: str | None = None):
        super().__init__()
        self.net = _LPIPS(pretrained=True, net="vgg", pnet_rand=True)
        if backbone_weights is not None:
            self._load_backbone(Path(backbone_weights))
        self.net.eval().requires_grad_(False)

    def _load_backbone(self, path: Path) -> None:
        if not path.is_file():
            raise FileNotFoundError(f"LPIPS backbone weights {path} not found; pass torchvision's vgg16 .pth file")
        state = torch.load(path, map_location="cpu", weights_only=True)
        layers = {int(name): m for s in range(1, 6) for name, m in getattr(self.net.net, f"slice{s}").named_children()}
        loaded = 0
        for idx, layer in layers.items():
            if isinstance(layer, nn.Conv2d):
                try:
                    layer.weight.data.copy_(state[f"features.{idx}.weight"])
                    layer.bias.data.copy_(state[f"features.{idx}.bias"])
                except KeyError as e:
                    raise ValueError(f"{path} is not a torchvision VGG16 state dict (missing {e})") from None
                loaded += 1
        assert loaded == 13, loaded

    def train(self, mode: bool = True):  # the network is frozen for good
        return super().train(False)

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        return self.net(x, y, normalize=False).mean()
