"""FlexAttention's BlockMask path gives the dense-mask SDPA result (CPU runs flex eagerly)."""

import pytest
import torch

from arsr.components.heads import BitwiseHead, IndexHead
from arsr.components.posenc import SARoPE
from arsr.nn.attention import block_causal_mask, use_flex
from arsr.nn.infinity import InfinityTransformer
from arsr.nn.transformer import NextScaleTransformer


def test_auto_picks_sdpa_on_cpu():
    assert not use_flex("auto", torch.device("cpu")) and use_flex("flex", torch.device("cpu"))
    m = block_causal_mask(torch.tensor([0, 1, 1, 2]), "sdpa", torch.float32)
    assert torch.equal(m.isfinite(), torch.tensor([[1, 0, 0, 0], [1, 1, 1, 0], [1, 1, 1, 0], [1, 1, 1, 1]]).bool())


@pytest.mark.filterwarnings("ignore")
@pytest.mark.parametrize("backbone", ["var", "infinity"])
def test_flex_block_mask_equals_dense_sdpa(backbone):
    torch.manual_seed(0)
    if backbone == "var":
        make = lambda impl: NextScaleTransformer(SARoPE(), IndexHead(16), depth=2, width=32, heads=2, latent_dim=4, patch_nums=(1, 2, 4),
                                                 num_classes=2, null_class=1, cond_drop=0.0, attention=impl)
        args = lambda: dict(label=torch.tensor([0, 1]), inputs=torch.randn(2, 20, 4))
    else:
        make = lambda impl: InfinityTransformer(token_dim=4, text_channels=128, text_maxlen=8, depth=2, width=32, heads=2,
                                                cond_drop=0.0, schedule=[1, 2, 4], attention=impl)
        args = lambda: dict(label=None, inputs=torch.randn(2, 20, 4), text=(torch.randn(2, 3, 128), torch.ones(2, 3, dtype=torch.bool)))
    dense, flex = make("sdpa").eval(), make("flex").eval()
    flex.load_state_dict(dense.state_dict())
    torch.manual_seed(1)
    a = args()
    with torch.no_grad():
        assert torch.allclose(dense(**a), flex(**a), atol=1e-5)
