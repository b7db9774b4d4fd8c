"""Class-to-image pretraining: folder classes packed into shards, carried to the batch, read by
ClassLabels, trained with label dropout and sampled with CFG against the null class (no LR input)."""

import json
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image

from arsr.components.conditioning import ClassLabels
from arsr.data import BadSample, pack_folder
from arsr.data.samples import parse_meta
from arsr.interfaces import SRBatch


def labelled_folder(root, per_class=2):
    for c, name in enumerate(["cat", "ant", "dog"]):  # ids follow the sorted names: ant 0, cat 1, dog 2
        (root / name / "sub").mkdir(parents=True)
        for i in range(per_class):
            arr = np.full((40, 40, 3), 60 * c + 10 * i, dtype=np.uint8)
            Image.fromarray(arr).save(root / name / ("sub" if i else ".") / f"{i}.png")
    return root


def test_class_from_folder_writes_labels_and_the_loader_carries_them(tmp_path):
    from arsr.components.degradations import BicubicDegradation
    from arsr.data import ShardDataModule

    src = labelled_folder(tmp_path / "src")
    report = pack_folder(src, tmp_path / "out", prefix="t", class_from="folder", progress=False)
    assert report.written == 6
    with tarfile.open(report.shards[0]) as tar:
        metas = [json.loads(tar.extractfile(m).read()) for m in tar.getmembers() if m.name.endswith(".json")]
    got = {m["source"]: (m["label"], m["class"]) for m in metas}
    assert got["ant/0.png"] == (0, "ant") and got["cat/sub/1.png"] == (1, "cat") and got["dog/0.png"] == (2, "dog")

    dm = ShardDataModule(report.shards, BicubicDegradation(4), val_shards=report.shards, crop_size=32, batch_size=3,
                         val_batch_size=6, num_workers=0)
    batch = next(iter(dm.val_dataloader()))
    assert sorted(batch["label"].tolist()) == [0, 0, 1, 1, 2, 2] and batch["label"].dtype == torch.long

    (src / "loose.png").write_bytes((src / "ant" / "0.png").read_bytes())
    with pytest.raises(ValueError, match="no class folder"):
        pack_folder(src, tmp_path / "again", class_from="folder", progress=False)


@pytest.mark.parametrize("label", [1.5, "cat", -2, True, [1]])
def test_label_field_is_type_checked(label):
    with pytest.raises(BadSample, match="label"):
        parse_meta(json.dumps({"label": label}).encode())
    assert parse_meta(json.dumps({"label": 7}).encode()) == ("", -1, 7)
    assert parse_meta(json.dumps({"caption": "x"}).encode()) == ("x", -1, -1)


def test_class_labels_policy():
    labels = ClassLabels(num_classes=5, cfg=4.0, sample_classes=[3, 1])
    batch = SRBatch(hr=torch.zeros(3, 3, 8, 8), label=torch.tensor([0, 4, -1]))
    assert labels(batch).tolist() == [0, 4, 5]  # unlabelled -> the null class
    with pytest.raises(ValueError, match="no 'label'.*--class_from"):
        labels(SRBatch(hr=torch.zeros(3, 3, 8, 8)))
    assert labels.inference(5, "cpu").tolist() == [3, 1, 3, 1, 3]
    assert ClassLabels(3).inference(5, "cpu").tolist() == [0, 1, 2, 0, 1]
    assert labels.neg_label is None and labels.cfg == 4.0  # CFG against the transformer's null class
    with pytest.raises(ValueError, match="sample_classes"):
        ClassLabels(3, sample_classes=[3])


def test_c2i_model_trains_without_lr_and_samples_classes_with_cfg():
    from arsr.components.heads import IndexHead
    from arsr.components.posenc import SARoPE
    from arsr.components.quantizers import MultiScaleVQ
    from arsr.nn.transformer import NextScaleTransformer
    from arsr.nn.vae import VQVAE
    from arsr.tasks.ar import ARFinetune, Inference, Training

    torch.manual_seed(0)
    pn = (1, 2, 4)
    tok = VQVAE(MultiScaleVQ(32, 8, pn), ch=32, ch_mult=(1, 2, 2), num_res_blocks=1)
    tr = NextScaleTransformer(SARoPE(), IndexHead(32), None, depth=2, width=64, heads=2, latent_dim=8, patch_nums=pn,
                              num_classes=4, null_class=3, cond_drop=0.1, init_adaln_gamma=0.1)
    task = ARFinetune(tr, tok, ClassLabels(3, cfg=4.0), inference=Inference(top_k=4))
    task.log = task.log_dict = lambda *a, **k: None
    g = torch.Generator().manual_seed(0)
    batch = {"hr": torch.rand(4, 3, 16, 16, generator=g), "lr": torch.rand(4, 3, 4, 4, generator=g),
             "lr_up": torch.rand(4, 3, 16, 16, generator=g), "label": torch.tensor([0, 1, 2, -1])}
    loss = task.training_step(batch, 0)
    loss.backward()
    assert torch.isfinite(loss) and tr.class_emb.weight.grad[:4].abs().sum(1).gt(0).all()  # 3 classes and the null one
    # without conditioning the LR is ignored: another lr_up gives the same loss (no dropout in eval)
    task.eval()
    with torch.no_grad():
        a = task.training_step(batch, 0)
        b = task.training_step(batch | {"lr_up": torch.zeros(4, 3, 16, 16), "lr": torch.zeros(4, 3, 4, 4)}, 0)
    assert torch.equal(a, b)
    # validation sampling: guided (CFG doubles the batch with the null class), classes in turn
    out = task.super_resolve(torch.zeros(3, 3, 16, 16), generator=torch.Generator().manual_seed(0))[-1]
    assert out.shape == (3, 3, 16, 16) and torch.isfinite(out).all()
