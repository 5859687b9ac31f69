"""The embedded benchmark generator: SA-1B and COCO formats, determinism."""

from __future__ import annotations

import copy
import io
import json
import tarfile

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from edgesam.config import DataConfig
from edgesam.data.shapes import CATEGORIES
from edgesam.data.synth import write_benchmark

SA1B_KEYS = {"id", "segmentation", "bbox", "area", "predicted_iou", "stability_score", "point_coords", "crop_box"}
CFG = DataConfig(num_train=6, num_val=3, images_per_tar=4, min_side=200, max_side=320, objects_per_image=(2, 4))


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    return out, write_benchmark(out, CFG)


def _read_tar(path):
    with tarfile.open(path) as tar:
        return {m.name: tar.extractfile(m).read() for m in tar.getmembers()}


def test_layout_and_manifest(bench):
    out, manifest = bench
    assert sorted(p.name for p in (out / "sa1b" / "train").iterdir()) == ["sa_000000.tar", "sa_000001.tar"]
    assert sorted(p.name for p in (out / "sa1b" / "val").iterdir()) == ["sa_000000.tar"]
    assert manifest["counts"]["train"]["images"] == 6 and manifest["counts"]["val"]["images"] == 3
    assert manifest["sa1b_dir"] == str(out / "sa1b")
    assert len(list((out / "coco" / "images").glob("sa_*.jpg"))) == 9
    card = (out / "DATASET_CARD.md").read_text()
    assert manifest["checksum"] in card and all(name in card for name in CATEGORIES)


def test_tar_opens_as_sa1b(bench):
    out, _ = bench
    members = _read_tar(out / "sa1b" / "train" / "sa_000000.tar")
    assert sorted(members) == sorted(f"sa_{i}.{ext}" for i in range(1, 5) for ext in ("jpg", "json"))
    for name in sorted(m for m in members if m.endswith(".json")):
        record = json.loads(members[name])
        info = record["image"]
        assert set(info) == {"image_id", "width", "height", "file_name"}
        image = np.asarray(Image.open(io.BytesIO(members[info["file_name"]])))
        assert image.shape == (info["height"], info["width"], 3) and info["height"] != info["width"]
        assert CFG.min_side <= min(image.shape[:2]) and max(image.shape[:2]) <= CFG.max_side
        assert len(record["annotations"]) >= 2
        masks = {}
        for ann in record["annotations"]:
            assert set(ann) == SA1B_KEYS and isinstance(ann["segmentation"]["counts"], str)
            mask = mask_utils.decode(ann["segmentation"]).astype(bool)
            assert mask.shape == image.shape[:2] and mask.sum() == ann["area"] > 0
            np.testing.assert_allclose(ann["bbox"], mask_utils.toBbox(ann["segmentation"]))
            x, y = ann["point_coords"][0]
            assert mask[int(y), int(x)]
            assert ann["crop_box"] == [0, 0, info["width"], info["height"]]
            masks[ann["id"]] = mask
        # Multi-granular: every part lies inside exactly one whole-object mask of the image.
        coco = COCO(str(out / "coco" / "annotations" / "instances_train.json"))
        wholes = {a["id"] for a in coco.loadAnns(coco.getAnnIds(imgIds=[info["image_id"]]))}
        assert wholes and wholes < set(masks)
        for ann_id in set(masks) - wholes:
            assert sum(bool((masks[ann_id] & ~masks[w]).sum() == 0) for w in wholes) == 1


def test_coco_loads_and_perfect_prediction_scores_ap_1(bench):
    out, _ = bench
    coco = COCO(str(out / "coco" / "annotations" / "instances_val.json"))
    assert [c["name"] for c in coco.loadCats(coco.getCatIds())] == list(CATEGORIES)
    anns = coco.loadAnns(coco.getAnnIds())
    assert anns and all(a["iscrowd"] == 0 for a in anns)
    for iou_type in ("segm", "bbox"):
        results = [dict(copy.deepcopy(a), score=1.0) for a in anns]
        evaluator = COCOeval(coco, coco.loadRes(results), iou_type)
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
        assert evaluator.stats[0] == pytest.approx(1.0)


def test_deterministic_from_seed(bench, tmp_path):
    out, manifest = bench
    small = CFG.model_copy(update={"num_train": 2, "num_val": 1, "images_per_tar": 2})
    again = write_benchmark(tmp_path / "a", small)
    assert write_benchmark(tmp_path / "b", small)["checksum"] == again["checksum"]
    assert _read_tar(tmp_path / "a" / "sa1b" / "train" / "sa_000000.tar")["sa_1.json"] == _read_tar(
        out / "sa1b" / "train" / "sa_000000.tar")["sa_1.json"]  # an image does not depend on the split size
    other = write_benchmark(tmp_path / "c", small.model_copy(update={"seed": 1}))
    assert other["checksum"] != again["checksum"]


def test_data_stage_references_user_paths(bench, tmp_path):
    from edgesam.config import RuntimeConfig
    from pipelines import data

    out, manifest = bench
    cfg = DataConfig(sa1b_path=out / "sa1b", coco_train=manifest["coco_train"], coco_images=out / "coco" / "images")
    body = data.run(cfg, RuntimeConfig(), {}, tmp_path)
    assert body["sa1b_dir"] == str(out / "sa1b") and body["coco_val"] is None and not body["synthetic"]
    assert body["inputs"] == {"train": 2, "val": 1} and not list(tmp_path.iterdir())
    with pytest.raises(FileNotFoundError, match="data.coco_val = .*nope.json: no such file"):
        data.run(cfg.model_copy(update={"coco_val": tmp_path / "nope.json"}), RuntimeConfig(), {}, tmp_path)
    with pytest.raises(FileNotFoundError, match="no sa_"):
        data.run(DataConfig(sa1b_path=tmp_path), RuntimeConfig(), {}, tmp_path)
