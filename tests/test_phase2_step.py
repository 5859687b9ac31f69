"""The phase-2 step at GPU speed, checked on the CPU: 2 x decode_iters decoder calls whatever the
batch, no host sync inside the step, the batched loss equal to the per-image reference, and
the sync-free pieces equal to segment-anything's own."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from edgesam.config import PromptKDConfig
from edgesam.data.transforms import preprocess
from edgesam.models.decoding import decode, embed_points
from edgesam.models.edgesam import build_edgesam
from edgesam.models.teacher import TeacherSource
from edgesam.models.tiny_sam import build_tiny_sam
from edgesam.objectives.distill import prompt_in_the_loop_loss, prompt_in_the_loop_loss_per_image
from edgesam.objectives.prompts import Prompts, batch_prompts
from edgesam.tasks.data import EmbedShards, device_images
from edgesam.tasks.prompt_kd import PromptKDModel, PromptKDTask
from edgesam.train.loop import TaskForward
from edgesam.train.step import NonFiniteGuard, TrainStep, build_optimizer

IMG = 64  # embeddings 4 x 4, low-res masks 16 x 16
BACKBONE = "mobilenetv3_small_050"


@pytest.fixture(scope="module")
def sams():
    torch.manual_seed(0)
    teacher = build_tiny_sam(img_size=IMG, embed_dim=32, depth=1, num_heads=1)
    student = build_edgesam(BACKBONE, IMG, decoder_init=teacher)
    for p in student.mask_decoder.parameters():  # a student that disagrees with its teacher
        p.data.add_(0.05 * torch.randn_like(p))
    return student, teacher.requires_grad_(False)


def _task(student, cfg: PromptKDConfig) -> PromptKDTask:
    return PromptKDTask(cfg, EmbedShards(IMG, [], 0), student, TeacherSource("synthetic", "-", "-", IMG))


def _image_prompts(count: int, gen: torch.Generator) -> Prompts:
    corner = torch.rand(count, 2, generator=gen) * 30
    boxes = torch.cat([corner, corner + 8 + torch.rand(count, 2, generator=gen) * 24], dim=1)
    return Prompts(torch.rand(count, 1, 2, generator=gen) * 60, torch.ones(count, 1, dtype=torch.long), boxes)


def _batch(counts: list[int], seed: int = 0) -> dict:
    """A collated phase-2 batch of len(counts) images with counts[i] prompts each (both kinds)."""
    gen = torch.Generator().manual_seed(seed)
    b = len(counts)
    hw = torch.tensor([[IMG, IMG - 16 * (i % 2)] for i in range(b)])
    valid = torch.zeros(b, IMG // 4, IMG // 4, dtype=torch.bool)
    for i, (h, w) in enumerate(hw.tolist()):
        valid[i, : h // 4, : w // 4] = True
    prompts, image_index = batch_prompts([_image_prompts(n, gen) for n in counts])
    return {"image": torch.randint(0, 256, (b, 3, IMG, IMG), dtype=torch.uint8, generator=gen), "hw": hw,
            "teacher_emb": torch.randn(b, 256, 4, 4, generator=gen).half(), "valid": valid,
            "key": [f"sa_{i}" for i in range(b)], "image_index": image_index,
            "prompts": {"boxes": prompts.boxes, "points": prompts.points, "labels": prompts.labels}}


@pytest.mark.parametrize("counts", [[3], [1, 4, 2], [1 + i % 5 for i in range(16)]])
@pytest.mark.parametrize("prompt_types", ["box", "point"])
def test_a_step_calls_each_decoder_once_per_iteration_whatever_the_batch(sams, counts, prompt_types):
    student, teacher = sams
    cfg = PromptKDConfig(decode_iters=3, prompt_types=prompt_types, min_disagreement_cells=0)
    model = PromptKDModel(copy.deepcopy(student), copy.deepcopy(teacher))
    calls = {"student": 0, "teacher": 0}
    for name in calls:
        getattr(model, name).mask_decoder.transformer.register_forward_hook(
            lambda *_, name=name: calls.__setitem__(name, calls[name] + 1))
    loss, metrics = _task(student, cfg).loss(model, _batch(counts))
    loss.backward()
    assert calls == {"student": 3, "teacher": 3}
    assert set(metrics) == {f"{m}_iter{k}" for m in ("loss", "iou") for k in range(3)} | {"box_steps"}


SYNCS = {"nonzero", "_local_scalar_dense", "item", "masked_select", "equal", "is_nonzero", "repeat_interleave"}


class HostSyncs(TorchDispatchMode):
    """Records every op that reads device data back to the host, or would on a GPU."""

    def __init__(self):
        super().__init__()
        self.found: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func.overloadpacket.__name__
        if name in SYNCS:
            self.found.append(name)
        if name in ("index", "index_put", "index_put_", "_index_put_impl_"):
            indices = args[1] if len(args) > 1 else kwargs.get("indices", [])
            if any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in indices):
                self.found.append(f"{name} with a boolean mask")
        if name in ("_to_copy", "copy_"):
            tensors = [a for a in args if isinstance(a, torch.Tensor)]
            target = kwargs.get("device")
            devices = {t.device for t in tensors} | ({torch.device(target)} if target is not None else set())
            if len(devices) > 1:
                self.found.append(f"{name} across devices {sorted(map(str, devices))}")
        return func(*args, **kwargs)


def test_one_phase2_step_has_no_host_sync(sams, monkeypatch):
    student, teacher = sams
    cfg = PromptKDConfig(decode_iters=2, prompt_types="point", min_disagreement_cells=0)
    task = _task(student, cfg)
    model = PromptKDModel(copy.deepcopy(student), copy.deepcopy(teacher))
    trainable = list(task.parameters(model))
    for p in model.parameters():
        p.requires_grad_(any(p is q for q in trainable))
    optimizer = build_optimizer(model, trainable, cfg.train, 1e-4)
    step = TrainStep(TaskForward(task, model), optimizer, trainable, 0.01, NonFiniteGuard(torch.device("cpu")))
    batch = _batch([2, 5, 1])
    read_back = []
    for method in ("cpu", "tolist", "item", "numpy"):  # on CPU tensors these never reach the dispatcher
        original = getattr(torch.Tensor, method)
        monkeypatch.setattr(torch.Tensor, method, lambda self, *a, _m=method, _o=original, **k:
                            read_back.append(_m) or _o(self, *a, **k))
    with HostSyncs() as mode:
        loss, metrics = step(batch, 1)
    monkeypatch.undo()
    assert mode.found == [] and read_back == []
    assert all(isinstance(v, torch.Tensor) for k, v in metrics.items() if k != "box_steps")
    assert torch.isfinite(loss) and step.guard.check() is None


def test_batched_loss_and_gradients_equal_the_per_image_reference(sams):
    student, teacher = sams
    gen = torch.Generator().manual_seed(3)
    per_image = [_image_prompts(n, gen) for n in (2, 5, 1)]
    valid = torch.ones(3, IMG, IMG, dtype=torch.bool)
    valid[1, :, 40:] = False
    emb = torch.randn(3, 256, 4, 4, generator=gen)
    for kind in ("box", "point"):
        cfg = PromptKDConfig(decode_iters=2, min_disagreement_cells=0, points_per_iter=2)
        prompts = [Prompts(boxes=p.boxes) if kind == "box" else Prompts(p.points, p.labels) for p in per_image]
        results = []
        for batched in (True, False):
            model = copy.deepcopy(student)
            s_emb = (emb + 0.3 * torch.randn(emb.shape, generator=torch.Generator().manual_seed(1))).requires_grad_()
            generator = torch.Generator().manual_seed(11)  # the same disagreement draws in both
            if batched:
                joined, index = batch_prompts(prompts)
                loss, metrics = prompt_in_the_loop_loss(model, teacher, s_emb, emb, joined, index, valid, cfg, generator)
            else:
                loss, metrics = prompt_in_the_loop_loss_per_image(model, teacher, s_emb, emb, prompts, valid, cfg,
                                                                  generator)
            loss.backward()
            grads = [s_emb.grad] + [p.grad for p in model.mask_decoder.parameters() if p.grad is not None]
            results.append((loss, metrics, grads))
        (loss_b, metrics_b, grads_b), (loss_r, metrics_r, grads_r) = results
        assert loss_b.item() > 0 and metrics_b["iou_iter1"] < 1.0
        torch.testing.assert_close(loss_b, loss_r, rtol=1e-5, atol=1e-6)
        for key in metrics_r:
            torch.testing.assert_close(metrics_b[key], metrics_r[key], rtol=1e-5, atol=1e-6, msg=key)
        assert len(grads_b) == len(grads_r) > 10
        for gb, gr in zip(grads_b, grads_r):
            torch.testing.assert_close(gb, gr, rtol=1e-4, atol=1e-6)


def test_sync_free_point_embedding_and_decode_equal_segment_anything_bit_for_bit(sams):
    _, teacher = sams
    encoder = copy.deepcopy(teacher.prompt_encoder)
    for p in encoder.parameters():
        p.data.normal_()
    gen = torch.Generator().manual_seed(0)
    points = torch.rand(5, 3, 2, generator=gen) * IMG
    labels = torch.tensor([[1, 0, -1], [0, 0, 1], [-1, -1, 1], [1, 1, 1], [2, 3, -1]])
    for pad in (True, False):
        assert torch.equal(embed_points(encoder, points, labels, pad), encoder._embed_points(points, labels, pad))
    emb, boxes = torch.randn(1, 256, 4, 4, generator=gen), torch.rand(5, 4, generator=gen) * IMG
    for p, lab, box in ((points, labels, None), (points, labels, boxes), (None, None, boxes)):
        sparse, dense = teacher.prompt_encoder(points=(p, lab) if p is not None else None, boxes=box, masks=None)
        want = teacher.mask_decoder.predict_masks(emb, teacher.prompt_encoder.get_dense_pe(), sparse, dense)
        got = decode(teacher, emb, p, lab, box, num_outputs=4)
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


def test_device_side_normalization_equals_preprocess_bit_for_bit():
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in ((64, 48), (40, 64))]
    padded = torch.zeros(2, 3, IMG, IMG, dtype=torch.uint8)
    for i, image in enumerate(images):
        padded[i, :, : image.shape[0], : image.shape[1]] = torch.from_numpy(image).permute(2, 0, 1)
    got = device_images(padded, torch.tensor([im.shape[:2] for im in images]))
    for i, image in enumerate(images):
        assert torch.equal(got[i], preprocess(image, IMG)[0])
