"""NSARM end to end: stage 1 -> stage 2 -> predict through the CLI on tiny sizes of the shipped
recipes, gradients of stage 2 into the transformation network, and its loss falling."""

import shlex

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from arsr.cli import main
from arsr.components.conditioning import NSARMTransformationNet, T5TextEncoder
from arsr.components.postprocess import ColorFix
from arsr.components.quantizers import MultiScaleBSQ
from arsr.nn.infinity import InfinityTransformer
from arsr.nn.vae import VQVAE
from arsr.tasks.ar import ARFinetune, Inference, Training

from conftest import ROOT, SAMPLE

TOKENIZER = ("--model.init_args.tokenizer.init_args.ch 32 --model.init_args.tokenizer.init_args.ch_mult '[1, 2, 2]' "
             "--model.init_args.tokenizer.init_args.quantizer.init_args.dim 8 "
             "--model.init_args.tokenizer.init_args.quantizer.init_args.schedule 0.06M")
NET = ("--model.init_args.scale_predictor.init_args.grid 4 --model.init_args.scale_predictor.init_args.dims '[32, 32, 32]' "
       "--model.init_args.scale_predictor.init_args.layers '[1, 1, 1]' --model.init_args.scale_predictor.init_args.heads '[2, 2, 2]' "
       "--model.init_args.scale_predictor.init_args.stem '[16, 16]'")
TRANSFORMER = ("--model.init_args.transformer.init_args.depth 2 --model.init_args.transformer.init_args.width 64 "
               "--model.init_args.transformer.init_args.heads 4 "
               "--model.init_args.transformer.init_args.text_channels 128 --model.init_args.transformer.init_args.text_maxlen 64 "
               f"--model.init_args.transformer.init_args.text.init_args.path {SAMPLE / 'tiny_t5'}")
CPU = "--trainer.accelerator cpu --trainer.devices 1 --trainer.precision 32 --trainer.strategy auto"
DATA = (f"--data.init_args.crop_size 64 --data.init_args.batch_size 2 --data.init_args.num_workers 0 "
        f"--data.init_args.train_shards '{SAMPLE}/train-{{000000..000001}}.tar' --data.init_args.val_shards {SAMPLE}/val-000000.tar")


def tiny_tokenizer() -> VQVAE:
    return VQVAE(MultiScaleBSQ(dim=8, schedule="0.06M"), ch=32, ch_mult=(1, 2, 2), num_res_blocks=2, using_sa=False,
                 using_mid_sa=False, quant_conv_ks=0)


def test_stage1_then_stage2_then_predict(tmp_path, monkeypatch):
    from safetensors.torch import save_file

    monkeypatch.chdir(tmp_path)
    torch.manual_seed(0)
    save_file(tiny_tokenizer().state_dict(), tmp_path / "tokenizer.safetensors")  # one tokenizer file for every stage
    tok = f"--model.init_args.tokenizer.init_args.weights {tmp_path / 'tokenizer.safetensors'}"
    stage1 = f"fit --config {ROOT}/recipes/nsarm_stage1.yaml {CPU} {DATA} --trainer.max_steps 2 {tok} {TOKENIZER} {NET}"
    assert main(shlex.split(stage1)) == 0
    s1 = tmp_path / "runs/nsarm_stage1/latest/checkpoints/last.safetensors"
    assert {k.split(".")[0] for k in load_file(s1)} == {"scale_predictor"}
    stage2 = (f"fit --config {ROOT}/recipes/nsarm_stage2.yaml {CPU} {DATA} --trainer.max_steps 2 {tok} {TOKENIZER} {NET} {TRANSFORMER} "
              f"--model.init_args.training.init_from '[{s1}]'")
    assert main(shlex.split(stage2)) == 0
    s2 = tmp_path / "runs/nsarm_stage2/latest/checkpoints/last.safetensors"
    w1, w2 = load_file(s1), load_file(s2)
    assert {k.split(".")[0] for k in w2} == {"scale_predictor", "transformer"} and not any(".text.encoder." in k for k in w2)
    assert any(not torch.equal(w1[k], w2[k]) for k in w1)  # stage 2 fine-tuned the network it started from
    lr_dir = tmp_path / "lr"
    lr_dir.mkdir()
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(lr_dir / "native.png")
    Image.fromarray(rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)).save(lr_dir / "tiled.png")
    (lr_dir / "native.txt").write_text("a photo of a red flower")
    predict = (f"predict --config {ROOT}/recipes/nsarm_stage2.yaml {CPU} {DATA} {tok} {TOKENIZER} {NET} {TRANSFORMER} "
               f"--config {ROOT}/recipes/predict.yaml --data.init_args.inputs '[{lr_dir}]' --trainer.callbacks.init_args.out_dir sr "
               f"--model.init_args.training.init_from '[{s2}]'")
    assert main(shlex.split(predict)) == 0
    outs = sorted(p.relative_to(tmp_path / "sr").as_posix() for p in (tmp_path / "sr").rglob("*.png"))
    assert len(outs) == 2, outs
    sizes = sorted(Image.open(tmp_path / "sr" / o).size for o in outs)
    assert sizes == [(64, 64), (96, 80)]


@pytest.fixture(scope="module")
def stage2_task():
    torch.manual_seed(0)
    tr = InfinityTransformer(text=T5TextEncoder(str(SAMPLE / "tiny_t5")), token_dim=8, text_channels=128, text_maxlen=64,
                             depth=2, width=64, heads=4, schedule="0.06M")
    net = NSARMTransformationNet(latent_dim=8, grid=4, sides=[1, 2, 4], dims=[32, 32, 32], layers=[1, 1, 1], heads=[2, 2, 2], stem=[16, 16])
    return ARFinetune(tr, tiny_tokenizer(), scale_predictor=net, training=Training(scale_weighting="sqrt_area"),
                      inference=Inference(cfg=1.0, temperature=0.5, top_k=0, top_p=0.97, postprocess=ColorFix()))


def batch(n: int = 2, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    hr = torch.rand(n, 3, 64, 64, generator=g)
    lr = torch.nn.functional.interpolate(hr, size=(16, 16), mode="area")
    return {"hr": hr, "lr": lr, "lr_up": torch.nn.functional.interpolate(lr, size=(64, 64), mode="bicubic").clamp(0, 1),
            "caption": ["a photo of a house", "a dog on the street"][:n]}


def test_stage2_gradients_reach_the_transformation_network(stage2_task):
    task = stage2_task
    task.log = task.log_dict = lambda *a, **k: None
    task.train()
    task.zero_grad()
    # the substituted scales (1..3) carry no CE of their own: only later scales' inputs reach the net
    assert not task.loss_mask[: 1 + 4 + 16].any() and task.loss_mask[21:].all()
    task.training_step(batch(), 0).backward()
    grads = [p.grad for p in task.scale_predictor.parameters()]
    assert all(g is not None for g in grads) and sum(g.abs().sum() for g in grads) > 0
    assert all(p.grad is None for p in task.tokenizer.parameters())
    # Infinity's per-scale weights: every token of scale k weighs 1/sqrt(h_k w_k), normalised over trained tokens
    w = task.token_weights
    assert torch.isclose(w.sum(), torch.tensor(1.0)) and torch.isclose(w[21] / w[-1], torch.tensor(16 / 6))


def test_stage2_loss_falls_and_inference_uses_the_network(stage2_task):
    from arsr.optim import AdamW

    task = stage2_task
    task.log = task.log_dict = lambda *a, **k: None
    task.train()
    opt = AdamW(list(task.named_parameters()), lr=3e-3)
    b = batch()
    losses = []
    for step in range(25):
        loss = task.training_step(b, step)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert sum(losses[-5:]) < sum(losses[:5]) - 0.05, losses
    task.eval()
    lr = b["lr"][:1] * 2 - 1
    tokens, _ = task.sample_tokens(b["lr_up"][:1] * 2 - 1, generator=torch.Generator().manual_seed(1), captions=["a house"], lr=lr)
    forced = [task.quantizer.residual_to_tokens(r, si) for si, r in enumerate(task.scale_predictor(lr))]
    assert all(torch.equal(tokens[si], f) for si, f in enumerate(forced))  # scales 1..3 come from the LR image
    sr = task.super_resolve_any(b["lr"][:1], caption="a house")[-1]
    assert sr.shape == (1, 3, 64, 64) and 0 <= sr.min() and sr.max() <= 1
