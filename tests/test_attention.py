"""FlexAttention's BlockMask path gives the dense-mask SDPA result (CPU runs flex eagerly)."""

import pytest
import torch

from arsr.components.heads import BitwiseHead, IndexHead
from arsr.components.posenc import SARoPE
import torch.nn.functional as F

from arsr.nn.attention import attend, block_causal_mask, dense_block_causal, use_flex
from arsr.nn.infinity import InfinityTransformer
from arsr.nn.transformer import NextScaleTransformer


def test_auto_picks_sdpa_on_cpu():
    assert not use_flex("auto", torch.device("cpu")) and use_flex("flex", torch.device("cpu"))
    m = dense_block_causal(torch.tensor([0, 1, 1, 2]))
    assert torch.equal(m.isfinite(), torch.tensor([[1, 0, 0, 0], [1, 1, 1, 0], [1, 1, 1, 0], [1, 1, 1, 1]]).bool())


@pytest.mark.parametrize("sizes", [(1, 4, 9, 16, 64, 100), (1, 4), (100, 80), (1, 4, 70, 3), (65,)])
def test_scale_chunks_equal_dense_masked_attention(sizes):
    """SDPA over query chunks (no scores of later scales computed) = dense masked attention, values and gradients."""
    torch.manual_seed(0)
    levels = [i for i, n in enumerate(sizes) for _ in range(n)]
    plan = block_causal_mask(levels, "sdpa", torch.float32)
    assert sum(qe - qs for qs, qe, _ in plan.chunks) == len(levels)
    q, k, v = (torch.randn(2, 2, len(levels), 8, requires_grad=True) for _ in range(3))
    dense = F.scaled_dot_product_attention(q, k, v, attn_mask=dense_block_causal(torch.tensor(levels)), scale=0.3)
    chunked = attend(q, k, v, plan, 0.3)
    assert torch.allclose(dense, chunked, atol=1e-6)
    g_dense = torch.autograd.grad(dense.square().sum(), (q, k, v))
    g_chunked = torch.autograd.grad(chunked.square().sum(), (q, k, v))
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(g_dense, g_chunked))


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


@pytest.mark.parametrize("backbone", ["var", "infinity"])
def test_bf16_residual_stream_option(backbone):
    """residual_bf16 carries the hidden states in bf16 under bf16 autocast (fp32 otherwise, and by
    default), and trains to logits close to the fp32-residual model's."""
    torch.manual_seed(0)
    if backbone == "var":
        make = lambda bf16: NextScaleTransformer(SARoPE(), IndexHead(16), depth=2, width=32, heads=2, latent_dim=4, patch_nums=(1, 2, 4),
                                                 num_classes=2, null_class=1, cond_drop=0.0, residual_bf16=bf16)
        args = dict(label=torch.tensor([0, 1]), inputs=torch.randn(2, 20, 4))
    else:
        make = lambda bf16: InfinityTransformer(token_dim=4, text_channels=128, text_maxlen=8, depth=2, width=32, heads=2,
                                                cond_drop=0.0, schedule=[1, 2, 4], residual_bf16=bf16)
        args = dict(label=None, inputs=torch.randn(2, 20, 4), text=(torch.randn(2, 3, 128), torch.ones(2, 3, dtype=torch.bool)))
    fp32, bf16 = make(False).eval(), make(True).eval()
    bf16.load_state_dict(fp32.state_dict())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        (a, ha), (b, hb) = fp32(**args, return_hidden=True), bf16(**args, return_hidden=True)
        b.float().sum().backward()
    assert ha.dtype == torch.float32 and hb.dtype == torch.bfloat16
    assert torch.allclose(a.float(), b.float(), atol=0.05) and all(p.grad is None or torch.isfinite(p.grad).all() for p in bf16.parameters())
    assert bf16(**args).dtype == fp32(**args).dtype == torch.float32  # no autocast: nothing changes


@pytest.mark.parametrize("backbone", ["var", "infinity"])
@pytest.mark.parametrize("cached", [False, True])
def test_a_block_traces_into_one_graph(backbone, cached):
    """training.compile compiles each block: its training step (chunked attention, drop path) and
    its KV-cache sampling step trace without a graph break (dynamo only, no code generation)."""
    from arsr.sampling import KVCache

    torch.manual_seed(0)
    if backbone == "var":
        m = NextScaleTransformer(SARoPE(), IndexHead(16), depth=2, width=32, heads=2, latent_dim=4, patch_nums=(1, 2, 3, 4, 8),
                                 num_classes=2, null_class=1, cond_drop=0.0, drop_path=0.1)
        args = dict(label=torch.tensor([0, 1]), inputs=torch.randn(2, m.layout.image_len - 1, 4))
    else:
        m = InfinityTransformer(token_dim=4, text_channels=128, text_maxlen=8, depth=2, width=32, heads=2, cond_drop=0.0,
                                schedule=[1, 2, 3, 4, 8], drop_path=0.1)
        args = dict(label=None, inputs=torch.randn(2, 93, 4), text=(torch.randn(2, 3, 128), torch.ones(2, 3, dtype=torch.bool)))
    block = m.blocks[0]
    seen = {}
    hook = block.register_forward_pre_hook(lambda mod, a: seen.__setitem__("args", a))
    m(**args)  # the block's real inputs
    hook.remove()
    x, *rest = seen["args"]
    if cached:  # a sampling step: the second scale's positions through the KV cache, no mask
        attn = block.attn if backbone == "var" else block.sa
        attn.cache = KVCache(x.shape[1])
        attn.cache.extend(*[torch.randn(2, 2, 1, 16)] * 2)
        x = x[:, 1:5]
        if backbone == "var":  # (ada, mask, rope, text)
            rest = [rest[0], None, rest[2][1:5], rest[3]]
        else:  # (gss, text, mask, rope)
            rest = [rest[0], rest[1], None, rest[3][1:5]]
    torch._dynamo.reset()
    explained = torch._dynamo.explain(block)(x, *rest)
    assert explained.graph_break_count == 0, explained.break_reasons
