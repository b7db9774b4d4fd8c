import pytest
import torch
import torchvision

from arsr.losses import LPIPS


def test_lpips_random_backbone_is_a_distance():
    torch.manual_seed(0)
    lp = LPIPS(None)
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    assert lp(x, x).item() == pytest.approx(0.0, abs=1e-6)
    assert lp(x, x + 0.3 * torch.randn_like(x)).item() > 0
    assert not any(p.requires_grad for p in lp.parameters())


def test_lpips_loads_a_local_vgg16_file(tmp_path):
    vgg = torchvision.models.vgg16(weights=None)
    torch.save(vgg.state_dict(), tmp_path / "vgg16.pth")
    lp = LPIPS(str(tmp_path / "vgg16.pth"))
    assert torch.equal(lp.net.net.slice1._modules["0"].weight, vgg.features[0].weight)
    assert torch.equal(lp.net.net.slice5._modules["28"].bias, vgg.features[28].bias)
    with pytest.raises(FileNotFoundError, match="vgg16"):
        LPIPS(str(tmp_path / "missing.pth"))
    torch.save({"foo": torch.zeros(1)}, tmp_path / "wrong.pth")
    with pytest.raises(ValueError, match="not a torchvision VGG16"):
        LPIPS(str(tmp_path / "wrong.pth"))
