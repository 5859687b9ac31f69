"""Phase-1 and phase-2 training tasks on hand-made distillation shards, through the shared loop."""

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools import mask as mask_utils

from edgesam.artifacts import Artifact, sha256_file
from edgesam.config import EncoderKDConfig, RuntimeConfig, load_profile
from edgesam.models.edgesam import build_edgesam, load_edgesam, save_edgesam
from edgesam.models.tiny_sam import build_tiny_sam, save_tiny_sam
from edgesam.train import NonFiniteLossError, fit, last_checkpoint_path, load_checkpoint
from edgesam.models.teacher import TeacherSource
from edgesam.tasks.data import EmbedShards
from edgesam.tasks.encoder_kd import EncoderKDTask
from edgesam.tasks.prompt_kd import PromptKDTask
from pipelines import encoder_kd, prompt_kd

IMG = 64
BACKBONE = "mobilenetv3_small_050"  # a tiny timm CNN with stride-16 and stride-32 features
LOCAL = RuntimeConfig(num_workers=0, seed=0)
SMOKE = load_profile("smoke")


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def _sample(rng: np.random.Generator, index: int, teacher) -> dict[str, bytes]:
    """A 64 x 48 image (padded at the bottom) with two rectangles, and its teacher embedding."""
    h, w = 48, 64
    image = rng.integers(0, 60, (h, w, 3), dtype=np.uint8)
    annotations = []
    for k in range(2):
        x0, y0 = int(rng.integers(0, 40)), int(rng.integers(0, 28))
        bw, bh = int(rng.integers(8, 24)), int(rng.integers(8, 20))
        mask = np.zeros((h, w), dtype=np.uint8)
        mask[y0 : y0 + bh, x0 : x0 + bw] = 1
        image[mask.astype(bool)] = 200 - 80 * k
        rle = mask_utils.encode(np.asfortranarray(mask))
        rle["counts"] = rle["counts"].decode()
        annotations.append({
            "id": k, "segmentation": rle, "bbox": [x0, y0, bw, bh], "area": bw * bh,
            "point_coords": [[x0 + bw / 2, y0 + bh / 2]],
        })
    from edgesam.data.transforms import preprocess

    with torch.no_grad():
        embedding = teacher.image_encoder(preprocess(image, IMG)[0][None])[0].numpy().astype(np.float16)
    jpg, emb = io.BytesIO(), io.BytesIO()
    Image.fromarray(image).save(jpg, format="JPEG", quality=95)
    np.save(emb, embedding)
    record = {"image": {"image_id": index, "width": w, "height": h, "file_name": f"sa_{index}.jpg"},
              "annotations": annotations}
    return {"jpg": jpg.getvalue(), "json": json.dumps(record).encode(), "emb.npy": emb.getvalue()}


@pytest.fixture(scope="module")
def kd_inputs(tmp_path_factory):
    """Teacher checkpoint, one training shard of 6 embedded samples, a phase-1 student."""
    root = tmp_path_factory.mktemp("kd")
    torch.manual_seed(0)
    teacher = build_tiny_sam(img_size=IMG, embed_dim=32, depth=1, num_heads=1)
    save_tiny_sam(teacher, root / "teacher.pt")
    rng = np.random.default_rng(0)
    for split, count in (("train", 6), ("val", 2)):
        (root / split).mkdir()
        with tarfile.open(root / split / "shard-000000.tar", "w") as tar:
            for i in range(count):
                for ext, data in _sample(rng, i, teacher).items():
                    _add(tar, f"sa_{i}.{ext}", data)
    save_edgesam(build_edgesam(BACKBONE, IMG, decoder_init=teacher), root / "phase1.pt")
    return root


def _teacher(root) -> TeacherSource:
    return TeacherSource("synthetic", str(root / "teacher.pt"), sha256_file(root / "teacher.pt"), IMG)


def _data(root) -> EmbedShards:
    return EmbedShards(IMG, [str(root / "train" / "shard-000000.tar")], 6)


def _encoder_task(root) -> EncoderKDTask:
    cfg = EncoderKDConfig(backbone=BACKBONE, train=SMOKE.encoder_kd.train.model_copy(update={"loader_workers": 0}))
    return EncoderKDTask.from_config(cfg, _data(root), _teacher(root), seed=0)


def _prompt_task(root, cls=PromptKDTask) -> PromptKDTask:
    cfg = SMOKE.prompt_kd.model_copy(update={"train": SMOKE.prompt_kd.train.model_copy(update={"loader_workers": 0})})
    return cls.from_config(cfg, _data(root), root / "phase1.pt", _teacher(root), seed=0)


def _losses_on_fixed_batch(task, lr: float, steps: int = 5) -> list[float]:
    torch.manual_seed(0)
    model = task.build_model()
    params = list(task.parameters(model))
    optimizer = torch.optim.AdamW(params, lr=lr)
    batch = next(iter(task.batches(0, 1, 0, 2)))
    model.train()
    losses = []
    for _ in range(steps):
        torch.manual_seed(1)  # the same disagreement points every step
        loss, _ = task.loss(model, batch)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


def test_encoder_kd_step_lowers_the_loss_on_a_fixed_batch(kd_inputs):
    task = _encoder_task(kd_inputs)
    batch = next(iter(task.batches(0, 1, 0, 2)))
    assert batch["image"].shape == (2, 3, IMG, IMG) and batch["teacher_emb"].shape == (2, 256, 4, 4)
    assert batch["valid"][0].tolist()[3] == [False] * 4  # the bottom 16 rows are padding
    losses = _losses_on_fixed_batch(task, SMOKE.encoder_kd.train.lr)
    assert losses[-1] < 0.9 * losses[0], losses


def test_prompt_kd_step_lowers_the_loss_on_a_fixed_batch(kd_inputs):
    task = _prompt_task(kd_inputs)
    model = task.build_model()
    trainable = {id(p) for p in task.parameters(model)}
    assert not any(id(p) in trainable for p in model.student.prompt_encoder.parameters())
    assert not any(id(p) in trainable for p in model.teacher.parameters())
    head = {id(p) for p in model.student.mask_decoder.iou_prediction_head.parameters()}
    assert all((id(p) in trainable) != (id(p) in head) for p in model.student.mask_decoder.parameters())
    batch = next(iter(task.batches(0, 1, 0, 2)))
    assert batch["valid"].shape == (2, 16, 16) and batch["image"].dtype == torch.uint8
    assert batch["teacher_emb"].dtype == torch.float16 and len(batch["key"]) == 2
    assert batch["prompts"]["boxes"].shape == (4, 4) and batch["image_index"].tolist() == [0, 0, 1, 1]
    losses = _losses_on_fixed_batch(task, 1e-3)
    assert losses[-1] < 0.9 * losses[0], losses


class _Killed(RuntimeError):
    pass


class _KilledPromptKD(PromptKDTask):
    """Dies (like a kill) on its `die_at`-th loss call."""

    die_at: int = 0

    def loss(self, model, batch):
        self.calls = getattr(self, "calls", 0) + 1
        if self.calls == self.die_at:
            raise _Killed(f"killed at call {self.calls}")
        loss, metrics = super().loss(model, batch)
        return (loss * float("nan") if self.die_at < 0 and self.calls >= -self.die_at else loss), metrics


def _fit_cfg():
    return SMOKE.prompt_kd.train.model_copy(update={"epochs": 2, "max_steps": 6, "checkpoint_every": 2, "loader_workers": 0,
                                                     "batch_size": 2, "lr": 1e-3})


def test_prompt_kd_resumes_after_a_kill_with_the_same_steps_and_optimizer(kd_inputs, tmp_path):
    cfg = _fit_cfg()
    straight = fit(_prompt_task(kd_inputs), cfg, LOCAL, tmp_path / "straight")
    killed = _prompt_task(kd_inputs, _KilledPromptKD)
    killed.die_at = 4
    with pytest.raises(_Killed):
        fit(killed, cfg, LOCAL, tmp_path / "killed")
    assert load_checkpoint(last_checkpoint_path(tmp_path / "killed"))["step"] == 2
    resumed = fit(_prompt_task(kd_inputs), cfg, LOCAL, tmp_path / "killed")
    assert resumed["steps"] == straight["steps"] == 6
    a = load_checkpoint(last_checkpoint_path(tmp_path / "straight"))
    b = load_checkpoint(last_checkpoint_path(tmp_path / "killed"))
    assert a["step"] == b["step"] == 6
    for key, value in a["model"].items():
        torch.testing.assert_close(b["model"][key], value, msg=key)
    for sa, sb in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()):
        torch.testing.assert_close(sb["exp_avg_sq"], sa["exp_avg_sq"])
    assert (tmp_path / "killed" / "student.pt").is_file()


def test_nan_loss_stops_with_a_clear_error_and_keeps_the_last_checkpoint(kd_inputs, tmp_path):
    task = _prompt_task(kd_inputs, _KilledPromptKD)
    task.die_at = -5  # NaN from the 5th step on
    with pytest.raises(NonFiniteLossError, match=r"non-finite loss \(nan\) at step 5 on the batch of samples sa_\d, "
                                                 r"sa_\d;.*step 4"):
        fit(task, _fit_cfg(), LOCAL, tmp_path)
    assert load_checkpoint(last_checkpoint_path(tmp_path))["step"] == 4
    assert not (tmp_path / "student.pt").exists()


def _upstream(kd_inputs, tmp_path) -> tuple[Artifact, Artifact]:
    """Committed embed and teacher artifacts over the fixture's files."""
    embed = Artifact("embed", "e", kd_inputs)
    embed.commit({"img_size": IMG, "splits": {"train": {"samples": 6}, "val": {"samples": 2}}})
    teacher = Artifact("teacher", "t", tmp_path / "teacher")
    teacher.path.mkdir()
    teacher.commit({"kind": "synthetic", "checkpoint": str(kd_inputs / "teacher.pt"), "img_size": IMG,
                    "sha256": sha256_file(kd_inputs / "teacher.pt")})
    return embed, teacher


def test_stages_write_students_and_report_miou(kd_inputs, tmp_path):
    embed, teacher = _upstream(kd_inputs, tmp_path)
    train = SMOKE.encoder_kd.train.model_copy(update={"max_steps": 2, "batch_size": 2, "loader_workers": 0})
    cfg1 = EncoderKDConfig(backbone=BACKBONE, train=train)
    body1 = encoder_kd.run(cfg1, LOCAL, {"embed": embed, "teacher": teacher}, tmp_path / "p1")
    phase1 = Artifact("encoder_kd", "p1", tmp_path / "p1")
    phase1.commit({**body1, "config": cfg1.model_dump(mode="json")})
    cfg2 = SMOKE.prompt_kd.model_copy(update={"train": train})
    body2 = prompt_kd.run(cfg2, LOCAL, {"embed": embed, "teacher": teacher, "encoder_kd": phase1}, tmp_path / "p2")
    for body, out in ((body1, tmp_path / "p1"), (body2, tmp_path / "p2")):
        assert body["steps"] == 2 and load_edgesam(out / body["student"]).image_encoder.img_size == IMG
    assert set(body2["miou"]) == {"teacher", "encoder_kd", "prompt_kd"}
    assert body2["miou"]["encoder_kd"] == body1["miou"]["encoder_kd"]
    for name in ("encoder_kd", "prompt_kd"):
        entry = body2["miou"][name]
        assert entry["objects"] == 4
        assert all(0.0 <= entry[k] <= 1.0 for k in ("box_gt", "point_gt", "box_teacher", "point_teacher"))
    assert set(body2["miou"]["teacher"]) == {"box_gt", "point_gt", "objects"}
    # watchable: the phase-2 student/teacher IoU of every decoding iteration, at the logged steps
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    assert body2["tensorboard"] == "tensorboard"
    events = EventAccumulator(str(tmp_path / "p2" / "tensorboard"))
    events.Reload()
    logged = [record["step"] for record in body2["loss"]["curve"]]
    assert cfg2.decode_iters >= 2 and [e.step for e in events.Scalars("train/loss")] == logged
    for k in range(cfg2.decode_iters):
        iou = events.Scalars(f"train/iou_iter{k}")
        assert [e.step for e in iou] == logged
        assert [e.value for e in iou] == pytest.approx([r[f"iou_iter{k}"] for r in body2["loss"]["curve"]], abs=1e-5)


def test_a_stage_hashes_the_teacher_checkpoint_once(kd_inputs, tmp_path, monkeypatch):
    import edgesam.models.teacher as teacher_module

    embed, teacher = _upstream(kd_inputs, tmp_path)
    hashed = []
    digests = teacher_module.file_digests
    monkeypatch.setattr(teacher_module, "file_digests", lambda path, *a: hashed.append(Path(path)) or digests(path, *a))
    train = SMOKE.encoder_kd.train.model_copy(update={"max_steps": 1, "batch_size": 2, "loader_workers": 0})
    encoder_kd.run(EncoderKDConfig(backbone=BACKBONE, train=train, eval_images=1), LOCAL,
                   {"embed": embed, "teacher": teacher}, tmp_path / "p1")
    assert hashed == [kd_inputs / "teacher.pt"]


def test_prompt_kd_measures_phase1_itself_when_evaluated_on_other_images(kd_inputs, tmp_path):
    embed, teacher = _upstream(kd_inputs, tmp_path)
    phase1 = Artifact("encoder_kd", "p1", tmp_path / "p1")
    phase1.path.mkdir()
    save_edgesam(load_edgesam(kd_inputs / "phase1.pt"), phase1.path / "student.pt")
    phase1.commit({"student": "student.pt", "config": {"eval_images": None}, "miou": {"encoder_kd": "stale"}})
    train = SMOKE.prompt_kd.train.model_copy(update={"max_steps": 1, "batch_size": 2, "loader_workers": 0})
    cfg = SMOKE.prompt_kd.model_copy(update={"train": train, "eval_images": 1})
    body = prompt_kd.run(cfg, LOCAL, {"embed": embed, "teacher": teacher, "encoder_kd": phase1}, tmp_path / "p2")
    assert body["miou"]["encoder_kd"]["objects"] == body["miou"]["prompt_kd"]["objects"] == 2


def test_prompt_kd_freeze_switches(kd_inputs):
    task = _prompt_task(kd_inputs)
    model = task.build_model()
    task.cfg = task.cfg.model_copy(update={"freeze_encoder": True})
    trainable = {id(p) for p in task.parameters(model)}
    head = {id(p) for p in model.student.mask_decoder.iou_prediction_head.parameters()}
    assert trainable == {id(p) for p in model.student.mask_decoder.parameters()} - head
    task.cfg = task.cfg.model_copy(update={"freeze_iou_head": False})
    assert {id(p) for p in task.parameters(model)} == {id(p) for p in model.student.mask_decoder.parameters()}
    task.cfg = task.cfg.model_copy(update={"freeze_iou_head": True})
    task.cfg = task.cfg.model_copy(update={"freeze_encoder": False, "freeze_decoder": True})
    assert {id(p) for p in task.parameters(model)} == {id(p) for p in model.student.image_encoder.parameters()}
    task.cfg = task.cfg.model_copy(update={"freeze_encoder": True})
    with pytest.raises(ValueError, match="nothing to train"):
        task.parameters(model)


def test_two_workers_leave_the_iou_head_as_the_teachers_and_frozen_parameters_out_of_the_optimizer(kd_inputs, tmp_path):
    """EdgeSAM never trains the IoU head: with DDP over 2 workers it must stay bit-identical."""
    import logging

    import ray

    from edgesam.models.tiny_sam import load_tiny_sam

    task = _prompt_task(kd_inputs)
    cfg = _fit_cfg().model_copy(update={"epochs": 1, "max_steps": 2, "batch_size": 1, "weight_decay": 0.5})
    ray.init(address="local",  # never a cluster left recorded in /tmp/ray
             num_cpus=2, object_store_memory=128 * 1024**2, include_dashboard=False, logging_level=logging.WARNING)
    try:
        fit(task, cfg, RuntimeConfig(num_workers=2, cpus_per_worker=1, object_store_mb=128, seed=0), tmp_path)
    finally:
        ray.shutdown()
    student, teacher = load_edgesam(tmp_path / "student.pt"), load_tiny_sam(kd_inputs / "teacher.pt")
    head = student.mask_decoder.iou_prediction_head.state_dict()
    for name, value in teacher.mask_decoder.iou_prediction_head.state_dict().items():
        assert torch.equal(head[name], value), name
    assert not torch.equal(student.mask_decoder.output_hypernetworks_mlps[0].layers[0].weight,
                           teacher.mask_decoder.output_hypernetworks_mlps[0].layers[0].weight)  # it did train
    optimizer = load_checkpoint(last_checkpoint_path(tmp_path))["optimizer"]
    in_optimizer = sum(len(group["params"]) for group in optimizer["param_groups"])
    assert in_optimizer == len(task.parameters(task.build_model()))


def test_fine_tune_from_a_previous_student_changes_its_weights_and_lowers_the_loss(kd_inputs, tmp_path):
    previous = load_edgesam(kd_inputs / "phase1.pt")
    cfg = SMOKE.prompt_kd.model_copy(update={"init": kd_inputs / "phase1.pt",
                                             "train": SMOKE.prompt_kd.train.model_copy(update={"loader_workers": 0})})
    task = PromptKDTask.from_config(cfg, _data(kd_inputs), cfg.init, _teacher(kd_inputs), seed=0)
    start = task.build_model().student
    for name, value in previous.state_dict().items():
        assert torch.equal(start.state_dict()[name], value), name  # it starts where the previous run ended
    losses = _losses_on_fixed_batch(task, 1e-3)
    assert losses[-1] < 0.9 * losses[0], losses
    embed, teacher = _upstream(kd_inputs, tmp_path)
    phase1 = Artifact("encoder_kd", "p1", tmp_path / "p1")
    phase1.path.mkdir()
    save_edgesam(build_edgesam(BACKBONE, IMG), phase1.path / "student.pt")  # not the one to start from
    phase1.commit({"student": "student.pt", "config": {"eval_images": None}, "miou": {}})
    train = cfg.train.model_copy(update={"max_steps": 2, "batch_size": 2, "lr": 1e-3})
    body = prompt_kd.run(cfg.model_copy(update={"train": train, "eval_images": 1}), LOCAL,
                         {"embed": embed, "teacher": teacher, "encoder_kd": phase1}, tmp_path / "p2")
    tuned = load_edgesam(tmp_path / "p2" / body["student"]).state_dict()
    changed = [k for k, v in previous.state_dict().items() if not torch.equal(tuned[k], v)]
    assert any(k.startswith("image_encoder.") for k in changed) and any(k.startswith("mask_decoder.") for k in changed)
    assert not any(k.startswith("mask_decoder.iou_prediction_head.") for k in changed)


def test_encoder_kd_passes_an_init_student_on_with_zero_epochs(kd_inputs, tmp_path):
    embed, teacher = _upstream(kd_inputs, tmp_path)
    train = SMOKE.encoder_kd.train.model_copy(update={"epochs": 0, "loader_workers": 0})
    cfg = EncoderKDConfig(backbone=BACKBONE, train=train, eval_images=1, init=kd_inputs / "phase1.pt")
    body = encoder_kd.run(cfg, LOCAL, {"embed": embed, "teacher": teacher}, tmp_path / "p1")
    passed, previous = load_edgesam(tmp_path / "p1" / body["student"]), load_edgesam(kd_inputs / "phase1.pt")
    assert body["steps"] == 0
    for name, value in previous.state_dict().items():
        assert torch.equal(passed.state_dict()[name], value), name
    with pytest.raises(ValueError, match="set encoder_kd.init"):
        encoder_kd.run(cfg.model_copy(update={"init": None}), LOCAL, {"embed": embed, "teacher": teacher}, tmp_path / "x")
    with pytest.raises(ValueError, match="is a mobilenetv3_small_050 student, but encoder_kd.backbone is resnet18"):
        encoder_kd.run(cfg.model_copy(update={"backbone": "resnet18", "train": train.model_copy(update={"epochs": 1})}),
                       LOCAL, {"embed": embed, "teacher": teacher}, tmp_path / "y")


def test_every_trainable_parameter_gets_a_gradient_where_ddp_is_told_so(kd_inputs):
    """find_unused_parameters=False is only right if the loss reaches every trainable parameter."""
    for task in (_encoder_task(kd_inputs), _prompt_task(kd_inputs)):
        assert task.find_unused_parameters is False
        model = task.build_model()
        trainable = list(task.parameters(model))
        loss, _ = task.loss(model, next(iter(task.batches(0, 1, 0, 2))))
        loss.backward()
        assert all(p.grad is not None for p in trainable), type(task).__name__
    prompt = _prompt_task(kd_inputs)
    prompt.cfg = prompt.cfg.model_copy(update={"freeze_iou_head": False})
    assert prompt.find_unused_parameters is True


def test_loader_workers_persist_across_epochs_and_see_each_epoch(kd_inputs):
    task = _encoder_task(kd_inputs)
    task.loader_workers = 1
    orders, workers = [], []
    for epoch in range(3):
        orders.append([key for batch in task.batches(0, 1, epoch, 2) for key in batch["key"]])
        (loader,) = task.loaders._loaders.values()
        workers.append([w.pid for w in loader.loader._iterator._workers])
    assert all(sorted(order) == [f"sa_{i}" for i in range(6)] for order in orders)
    assert len({tuple(order) for order in orders}) > 1  # reshuffled per epoch, inside the same worker
    assert workers[0] == workers[1] == workers[2]


def test_encoder_kd_reads_its_init_student_once(kd_inputs, tmp_path, monkeypatch):
    import edgesam.tasks.encoder_kd as encoder_kd_task

    reads = []
    load = encoder_kd_task.load_student
    monkeypatch.setattr(encoder_kd_task, "load_student", lambda path, size: reads.append(path) or load(path, size))
    embed, teacher = _upstream(kd_inputs, tmp_path)
    train = SMOKE.encoder_kd.train.model_copy(update={"max_steps": 1, "batch_size": 2, "loader_workers": 0})
    cfg = EncoderKDConfig(backbone=BACKBONE, train=train, eval_images=1, init=kd_inputs / "phase1.pt")
    encoder_kd.run(cfg, LOCAL, {"embed": embed, "teacher": teacher}, tmp_path / "p1")
    assert reads == [kd_inputs / "phase1.pt"]
