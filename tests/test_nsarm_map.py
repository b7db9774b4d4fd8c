"""NSARM transformation network: released sizes, official key layout, output layout, contract."""

import re

import pytest
import torch

from arsr.interfaces import Layout
from torch import nn

from arsr.components.conditioning import NSARMTransformationNet
from arsr.components.conditioning.nsarm_map import NSARM_8B

TINY = dict(latent_dim=4, grid=8, sides=(1, 2, 4, 8), dims=(8, 8, 16, 16), layers=(1, 1, 2, 1), heads=(2, 2, 4, 2), stem=(8, 8))


def official_shapes(d: int, g: int, dims, layers, stem=(64, 128)) -> dict[str, tuple[int, ...]]:
    """Key -> shape of the released ``map_transformer`` state dict, written from the facts file (E.1)."""
    out = {}
    widths = [d, *stem, d]
    for i, (a, b) in enumerate(zip(widths, widths[1:])):
        out |= {f"feature_extractor.{3 * i}.weight": (b, a, 3, 3), f"feature_extractor.{3 * i}.bias": (b,),
                f"feature_extractor.{3 * i + 1}.weight": (b, g, g), f"feature_extractor.{3 * i + 1}.bias": (b, g, g)}
    for k, (dim, depth) in enumerate(zip(dims, layers)):
        h = dim // 2
        out |= {f"feature_transforms.{k}.0.weight": (h, d, 3, 3), f"feature_transforms.{k}.0.bias": (h,),
                f"feature_transforms.{k}.1.weight": (h, g, g), f"feature_transforms.{k}.1.bias": (h, g, g),
                f"feature_transforms.{k}.3.weight": (dim, h, 3, 3), f"feature_transforms.{k}.3.bias": (dim,),
                f"feature_transforms.{k}.4.weight": (dim, g, g), f"feature_transforms.{k}.4.bias": (dim, g, g)}
        for j in range(depth):
            p = f"transformers.{k}.layers.{j}."
            out |= {p + "self_attn.in_proj_weight": (3 * dim, dim), p + "self_attn.in_proj_bias": (3 * dim,),
                    p + "self_attn.out_proj.weight": (dim, dim), p + "self_attn.out_proj.bias": (dim,),
                    p + "linear1.weight": (4 * dim, dim), p + "linear1.bias": (4 * dim,),
                    p + "linear2.weight": (dim, 4 * dim), p + "linear2.bias": (dim,),
                    p + "norm1.weight": (dim,), p + "norm1.bias": (dim,), p + "norm2.weight": (dim,), p + "norm2.bias": (dim,)}
        out |= {f"output_projs.{k}.0.weight": (h, dim), f"output_projs.{k}.0.bias": (h,),
                f"output_projs.{k}.1.weight": (h,), f"output_projs.{k}.1.bias": (h,),
                f"output_projs.{k}.3.weight": (d, h), f"output_projs.{k}.3.bias": (d,)}
    return out


def test_released_8b_size_on_meta():
    with torch.device("meta"):
        net = NSARMTransformationNet.nsarm_8b()
    assert sum(p.numel() for p in net.parameters()) == 385_103_600  # facts E.1 / E.5
    sd = net.state_dict()
    assert len(sd) == 950
    expected = official_shapes(14, 32, NSARM_8B["dims"], NSARM_8B["layers"])
    assert {k: tuple(v.shape) for k, v in sd.items()} == expected


def test_tiny_shapes_keys_and_strict_official_load():
    net = NSARMTransformationNet(**TINY).eval()
    expected = official_shapes(4, 8, TINY["dims"], TINY["layers"], TINY["stem"])
    pattern = re.compile(r"(feature_extractor\.[013467]|feature_transforms\.\d\.[0134]|output_projs\.\d\.[013]"
                         r"|transformers\.\d\.layers\.\d\.(self_attn\.(in_proj_|out_proj\.)|linear[12]\.|norm[12]\.))")
    assert all(pattern.match(k) for k in net.state_dict())
    official = {k: torch.randn(s) for k, s in expected.items()}
    net.load_state_dict(official, strict=True)
    assert torch.equal(net.feature_transforms[2][4].weight, official["feature_transforms.2.4.weight"])
    out = net.predict_from_features(torch.randn(3, 4, 8, 8))
    assert [tuple(o.shape) for o in out] == [(3, 4, s, s) for s in TINY["sides"]]


def test_raw_reshape_layout():
    """Head token t, channel c lands at flat position t * d + c of the (d, h, w) map (no transpose)."""
    net = NSARMTransformationNet(**TINY).eval()
    for proj in net.output_projs:
        nn.init.zeros_(proj[3].weight)
        proj[3].bias.data = torch.arange(4.0)  # every token emits (0, 1, 2, 3)
    for o, s in zip(net.predict_from_features(torch.randn(2, 4, 8, 8)), TINY["sides"]):
        flat = o.flatten(1)  # (B, d*s*s), channel-major
        assert torch.equal(flat, (torch.arange(4 * s * s) % 4).float().expand(2, -1))
    # with a transpose channel 0 would be all zeros; here it holds 0,1,2,3,0,... along the row-major grid
    assert torch.equal(o[0, 0, 0, :4], torch.tensor([0.0, 1.0, 2.0, 3.0]))


def test_tokens_enter_encoder_row_major():
    """The pooled map enters the encoder as row-major (h, w) tokens (a 2x2 map pooled to 2x2 is itself)."""
    net = NSARMTransformationNet(latent_dim=2, grid=2, sides=(2,), dims=(2,), layers=(1,), heads=(1,), stem=(2,)).eval()
    seen = []
    net.transformers[0].register_forward_hook(lambda m, i, o: seen.append(i[0]))
    x = torch.randn(1, 2, 2, 2)
    net.predict_from_features(x)
    ref = net.feature_transforms[0](net.feature_extractor(x))  # (1, 2, 2, 2)
    assert torch.allclose(seen[0][0], ref[0].permute(1, 2, 0).reshape(4, 2))


class FakeTokenizer(nn.Module):
    """encode: stride-2 conv, 3 -> 4 channels."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 2, stride=2)

    def encode(self, img):
        return self.conv(img)


def test_contract_bind_forward_and_errors():
    net = NSARMTransformationNet(**TINY)
    sides = lambda *s: tuple((n, n) for n in s) + ((16, 16),)  # the schedule's first scales (+ one left to the transformer)
    net.bind(Layout(0, 1, 4, sides(1, 2, 4, 8)))
    with pytest.raises(ValueError, match="built for sides"):
        net.bind(Layout(0, 1, 4, sides(1, 2, 3, 8)))
    with pytest.raises(ValueError, match="latent_dim 4"):
        net.bind(Layout(0, 1, 32, sides(1, 2, 4, 8)))
    with pytest.raises(RuntimeError, match="no tokenizer"):
        net(torch.rand(1, 3, 16, 16))
    tok = FakeTokenizer()
    net.attach_tokenizer(tok)
    assert not any(k.startswith("_tokenizer") for k in net.state_dict())
    out = net(torch.rand(2, 3, 16, 16) * 2 - 1)
    assert [tuple(o.shape) for o in out] == [(2, 4, s, s) for s in TINY["sides"]]
    sum(o.square().mean() for o in out).backward()
    assert tok.conv.weight.grad is None and net.feature_extractor[0].weight.grad is not None
    with pytest.raises(ValueError, match=r"expects LR features \(B, 4, 8, 8\), got \(1, 4, 10, 10\)"):
        net(torch.rand(1, 3, 20, 20))
    with pytest.raises(ValueError, match="one entry per scale"):
        NSARMTransformationNet(**(TINY | {"heads": (2, 2, 4)}))


def test_sizes_left_out_come_from_the_tokenizer():
    from arsr.components.quantizers import MultiScaleBSQ
    from arsr.interfaces import Layout

    net = NSARMTransformationNet(grid=4, dims=[16, 16], layers=[1, 1], heads=[2, 2], stem=[8, 8])
    layout = Layout.of(MultiScaleBSQ(dim=6, schedule=[(1, 1), (2, 2), (4, 4)]))
    net.bind(layout)
    assert (net.latent_dim, net.sides) == (6, ((1, 1), (2, 2)))
    out = net.predict_from_features(torch.randn(2, 6, 4, 4))
    assert [tuple(r.shape) for r in out] == [(2, 6, 1, 1), (2, 6, 2, 2)]
    with pytest.raises(ValueError, match=r"built for sides \(\(1, 1\), \(4, 4\)\), the schedule's first 2 scales are \(\(1, 1\), \(2, 2\)\)"):
        NSARMTransformationNet(6, 4, [1, 4], dims=[16, 16], layers=[1, 1], heads=[2, 2], stem=[8, 8]).bind(layout)
