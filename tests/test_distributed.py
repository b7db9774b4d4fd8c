"""Two CPU processes (gloo): DDP and FSDP2 (ModelParallelStrategy) through the real CLI."""

import os
import subprocess
import sys

import pytest
import torch

from conftest import ROOT, tiny_argv

pytestmark = pytest.mark.slow

RECIPE = ROOT / "recipes" / "nsarm_stage2.yaml"


def run(tmp_path, strategy: list[str]):
    argv = tiny_argv(RECIPE)
    env = os.environ | {"HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "arsr", *argv, "--trainer.devices", "2", *strategy,
                           "--trainer.num_sanity_val_steps", "0",
                           "--trainer.limit_val_batches", "0"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=400)


@pytest.mark.parametrize("strategy", [["--trainer.strategy", "ddp"],
                                      ["--trainer.strategy", "lightning.pytorch.strategies.ModelParallelStrategy",
                                       "--trainer.strategy.save_distributed_checkpoint", "false",
                                       "--model.init_args.training.activation_checkpointing", "true"]],
                         ids=["ddp", "fsdp2"])
def test_two_process_cpu(tmp_path, strategy):
    r = run(tmp_path, strategy)
    assert r.returncode == 0, r.stderr[-4000:]
    ckpt = next(tmp_path.rglob("last.ckpt"))
    state = torch.load(ckpt, weights_only=False, map_location="cpu")
    assert state["global_step"] == 2
    from safetensors.torch import load_file

    weights = load_file(next(tmp_path.rglob("last.safetensors")))
    assert weights["transformer.blocks.0.sa.mat_qkv.weight"].shape == (192, 64)  # full, not a shard (Infinity block)
    assert not any("_checkpoint_wrapped_module" in k or k.startswith("tokenizer.") for k in weights)
