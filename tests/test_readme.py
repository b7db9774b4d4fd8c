"""The README's extension examples are real: each Python block runs and plugs into the frame."""

import re
import types

import torch

from conftest import ROOT


def readme_module() -> types.ModuleType:
    blocks = re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), flags=re.S)
    assert len(blocks) >= 2
    mod = types.ModuleType("readme_examples")
    for code in blocks:
        exec(compile(code, "README.md", "exec"), mod.__dict__)
    return mod


def test_readme_positional_encoding_example():
    from arsr.components.heads import IndexHead
    from arsr.components.quantizers import MultiScaleVQ
    from arsr.nn.transformer import NextScaleTransformer

    m = readme_module()
    tr = NextScaleTransformer(m.Sinusoidal(), IndexHead(16), None, depth=1, width=32, heads=2, latent_dim=4,
                              patch_nums=(1, 2, 4), num_classes=2, null_class=1).eval()
    assert tr(torch.tensor([0]), torch.randn(1, 20, 4)).shape == (1, 21, 16)
    q = MultiScaleVQ(16, 4, (1, 2, 4))
    greedy = tr.generate(q, torch.tensor([0]), top_k=1)
    assert torch.equal(tr(torch.tensor([0]), q.indices_to_teacher_input(greedy)).argmax(-1), torch.cat(greedy, 1))


def test_readme_degradation_example():
    m = readme_module()
    out = m.BlurOnly(scale=4)(torch.rand(2, 3, 32, 32))
    assert out.lr.shape == (2, 3, 8, 8) and out.lr_up.shape == (2, 3, 32, 32) and out.degraded.all()
