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
    out = m.BlurOnly(scale=4)(torch.rand(2, 3, 32, 32), generator=torch.Generator().manual_seed(0), seeds=[1, 2])  # as the data module calls it
    assert out.lr.shape == (2, 3, 8, 8) and out.lr_up.shape == (2, 3, 32, 32) and out.degraded.all()


def test_readme_component_is_one_file_and_one_yaml_line(tmp_path, monkeypatch):
    """The walkthrough as a user does it: the class in its own file, the README's YAML line after a
    recipe; the CLI builds the model with it and a training step runs."""
    from arsr.cli import ARSRCLI

    code = re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), flags=re.S)[0]
    yaml_line = re.search(r"```yaml\n# sinusoidal.yaml\n(.*?)```", (ROOT / "README.md").read_text(), flags=re.S).group(1)
    (tmp_path / "my_pkg").mkdir()
    (tmp_path / "my_pkg" / "__init__.py").write_text("")
    (tmp_path / "my_pkg" / "posenc.py").write_text(code)
    (tmp_path / "sinusoidal.yaml").write_text(yaml_line)
    monkeypatch.syspath_prepend(str(tmp_path))
    cli = ARSRCLI(args=["--config", str(ROOT / "recipes" / "quickstart.yaml"), "--config", str(tmp_path / "sinusoidal.yaml"),
                        "--model.init_args.tokenizer.init_args.weights", "null"], run=False)
    task = cli.model
    assert type(task.transformer.pos_enc).__name__ == "Sinusoidal"
    hr = torch.rand(2, 3, task.native_size, task.native_size)
    lr = torch.nn.functional.interpolate(hr, scale_factor=0.25, mode="area")
    batch = {"hr": hr, "lr": lr, "lr_up": torch.nn.functional.interpolate(lr, scale_factor=4, mode="bicubic"),
             "quality": torch.ones(2, dtype=torch.long)}
    task.log = task.log_dict = lambda *a, **k: None
    loss = task.training_step(batch, 0)
    loss.backward()
    assert torch.isfinite(loss) and task.transformer.word_embed.weight.grad is not None


def test_readme_lists_every_arfinetune_setting_with_its_default():
    import dataclasses

    import yaml

    from arsr.inference import Inference
    from arsr.tasks.ar import Training

    block = re.search(r"```yaml\n# ARFinetune settings\n(.*?)```", (ROOT / "README.md").read_text(), flags=re.S).group(1)
    documented = yaml.safe_load(block)
    for kind in (Training, Inference):
        name = "training" if kind is Training else "inference"
        assert documented[name] == {f.name: f.default for f in dataclasses.fields(kind)}
