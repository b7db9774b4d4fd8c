"""Any component can be swapped into any recipe by a CLI override, and the run still trains;
and the AR tasks' losses fall on a tiny overfit set."""

import pytest
import torch

from arsr.cli import main

from conftest import ROOT, tiny_argv

T = "--model.init_args.transformer.init_args"
SWAPS = {
    # DPO regulariser on NSARM (bitwise head, substituted scales)
    "dpo_on_nsarm": ("nsarm_stage2", ["--model.init_args.regularizer", "arsr.components.regularizers.DPO",
                                      "--model.init_args.regularizer.beta", "0.1"]),
    # SA-RoPE instead of the learned resampled grid on MSVAR
    "sarope_on_msvar": ("msvar_dpo", [f"{T}.pos_enc", "arsr.components.posenc.SARoPE"]),
    # MSVAR's encoder-feature conditioning and learned grid on VARSR
    "encoder_features_on_varsr": ("varsr", [f"{T}.conditioning", "arsr.components.conditioning.EncoderFeatures",
                                            f"{T}.conditioning.grid", "8", f"{T}.conditioning.latent_dim", "8",
                                            f"{T}.pos_enc", "arsr.components.posenc.LearnedResampled",
                                            f"{T}.pos_enc.grid", "8"]),
    # VAR's absolute table, no refiner, degradation classes on VARSR
    "absolute_no_refiner_on_varsr": ("varsr", [f"{T}.pos_enc", "arsr.components.posenc.AbsolutePerScale",
                                               "--model.init_args.refiner", "null",
                                               "--model.init_args.labels", "arsr.components.conditioning.DegradationClasses",
                                               "--model.init_args.labels.class_free", "1"]),
}


@pytest.mark.parametrize("name", sorted(SWAPS))
def test_component_swap_runs_a_step(name, tmp_path, monkeypatch, capsys):
    recipe, extra = SWAPS[name]
    argv = tiny_argv(ROOT / "recipes" / f"{recipe}.yaml")
    argv = [a if a != "2" or argv[i - 1] != "--trainer.max_steps" else "1" for i, a in enumerate(argv)]
    monkeypatch.chdir(tmp_path)
    assert main([*argv, *extra, "--print_config"]) == 0
    assert extra[1] in capsys.readouterr().out  # the override is in the resolved config
    assert main([*argv, *extra]) == 0
    assert list(tmp_path.rglob("last.safetensors"))


def _overfit(task, batch, steps=30, lr=3e-3):
    task.log = task.log_dict = lambda *a, **k: None
    opt = torch.optim.AdamW([p for p in task.parameters() if p.requires_grad], lr=lr)
    losses = []
    for i in range(steps):
        loss = task.training_step(batch, i)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def test_ar_finetune_loss_falls_on_a_tiny_set():
    from arsr.components.conditioning import PrefixTokens, QualityCFG
    from arsr.components.heads import IndexHead
    from arsr.components.posenc import SARoPE
    from arsr.components.quantizers import MultiScaleVQ
    from arsr.nn.transformer import NextScaleTransformer
    from arsr.nn.vae import VQVAE
    from arsr.tasks.ar import ARFinetune

    torch.manual_seed(0)
    pn = (1, 2, 4)
    tok = VQVAE(MultiScaleVQ(32, 8, pn), ch=32, ch_mult=(1, 2, 2), num_res_blocks=1)
    tr = NextScaleTransformer(SARoPE(), IndexHead(32), PrefixTokens((8, 16, 32), grid=4), depth=2, width=64, heads=2,
                              latent_dim=8, patch_nums=pn, num_classes=2, null_class=None, cond_drop=0.0, init_adaln_gamma=0.1)
    task = ARFinetune(tr, tok, QualityCFG())
    g = torch.Generator().manual_seed(0)
    batch = {"hr": torch.rand(4, 3, 16, 16, generator=g), "lr_up": torch.rand(4, 3, 16, 16, generator=g),
             "lr": torch.rand(4, 3, 4, 4, generator=g), "quality": torch.ones(4, dtype=torch.long)}
    losses = _overfit(task, batch)
    assert sum(losses[-3:]) / 3 < 0.8 * sum(losses[:3]) / 3


def test_transform_align_loss_falls():
    from arsr.components.conditioning import TransformationNet
    from arsr.components.quantizers import MultiScaleBSQ
    from arsr.nn.vae import VQVAE
    from arsr.tasks.ar import TransformAlign

    torch.manual_seed(0)
    tok = VQVAE(MultiScaleBSQ(8, (1, 2, 4)), ch=32, ch_mult=(1, 2, 2), num_res_blocks=1)
    task = TransformAlign(TransformationNet(num_scales=2, width=16, downsample=4), tok)
    g = torch.Generator().manual_seed(1)
    batch = {"hr": torch.rand(4, 3, 16, 16, generator=g), "lr": torch.rand(4, 3, 4, 4, generator=g)}
    losses = _overfit(task, batch, steps=40)
    assert losses[-1] < 0.5 * losses[0]
