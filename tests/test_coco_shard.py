"""COCO/LVIS sources in the shard stage: counts, masks, every bad input, repairs, crowds, mixing, resume,
and the embedded benchmark's COCO files through the data and shard stages."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils

from edgesam.artifacts import ArtifactStore
from edgesam.config import CocoSource, DataConfig, RuntimeConfig, ShardConfig, load_profile
from edgesam.data import coco_units
from edgesam.data.shards import iter_samples, list_shards
from edgesam.data.synth import write_benchmark
from edgesam.data.units import id_fraction
from edgesam.eval.datasets import shard_items
from flows.params import pipeline_config
from pipelines import shard
from edgesam.config import parse_overrides
from pipelines.stage import run_dag

SIZES = [(320, 240), (200, 300), (256, 256), (180, 150), (400, 300), (300, 330)]  # (w, h) of images 1..6


def _photo(w: int, h: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8))


def _rect(x0: float, y0: float, x1: float, y1: float) -> list[float]:
    return [x0, y0, x1, y0, x1, y1, x0, y1]


def _good_annotations(image_id: int, w: int, h: int) -> list[dict]:
    """A rectangle, an L-shaped polygon pair, a triangle and a compressed RLE disc."""
    yy, xx = np.mgrid[:h, :w]
    disc = np.asfortranarray(((xx - 0.7 * w) ** 2 + (yy - 0.7 * h) ** 2 < (0.15 * min(w, h)) ** 2).astype(np.uint8))
    rle = mask_utils.encode(disc)
    base = image_id * 100
    anns = [
        {"segmentation": [_rect(0.1 * w, 0.1 * h, 0.4 * w, 0.35 * h)], "category_id": 1},
        {"segmentation": [_rect(0.5 * w, 0.05 * h, 0.9 * w, 0.2 * h), _rect(0.5 * w, 0.2 * h, 0.6 * w, 0.45 * h)],
         "category_id": 2},
        {"segmentation": [[0.1 * w, 0.9 * h, 0.45 * w, 0.9 * h, 0.25 * w, 0.5 * h]], "category_id": 1},
        {"segmentation": {"size": [h, w], "counts": rle["counts"].decode()}, "category_id": 2},
    ]
    for k, ann in enumerate(anns):
        seg = ann["segmentation"]
        rles = mask_utils.frPyObjects(seg, h, w) if isinstance(seg, list) else [seg]
        ann.update(id=base + k, image_id=image_id, iscrowd=0,
                   bbox=[float(v) for v in mask_utils.toBbox(mask_utils.merge(rles))],
                   area=float(mask_utils.area(mask_utils.merge(rles))))
    return anns


def _coco(root: Path, name: str, ids: list[int], extra_images: list[dict] = (), extra_anns: list[dict] = ()) -> Path:
    """An instances JSON over images `ids` (written to root/images) with good annotations, then the extras."""
    images, annotations = [], []
    (root / "images").mkdir(parents=True, exist_ok=True)
    for i in ids:
        w, h = SIZES[(i - 1) % len(SIZES)]
        file_name = f"img_{i}.jpg" if i % 2 else f"img_{i}.png"  # any format PIL reads
        _photo(w, h, i).save(root / "images" / file_name)
        images.append({"id": i, "width": w, "height": h, "file_name": file_name})
        annotations += _good_annotations(i, w, h)
    images, annotations = images + list(extra_images), annotations + list(extra_anns)
    path = root / f"{name}.json"
    categories = [{"id": 1, "name": "thing"}, {"id": 2, "name": "stuff"}]
    path.write_text(json.dumps({"images": images, "annotations": annotations, "categories": categories}))
    return path


def _source(path: Path, split: str = "auto", name: str | None = None) -> dict:
    """The data manifest's record of a source (as the data stage writes it)."""
    return CocoSource(annotations=path, images=path.parent / "images", split=split, name=name).model_dump(mode="json")


def _run(tmp: Path, data: dict, name: str = "out", **cfg) -> tuple[dict, Path]:
    artifact = ArtifactStore(tmp / "store").artifact("data", name)
    artifact.path.mkdir(parents=True, exist_ok=True)
    artifact.commit({"sa1b_dir": None, "coco_sources": [], **data})
    out = tmp / name
    out.mkdir(parents=True, exist_ok=True)
    body = shard.run(ShardConfig(**{"workers": 1, "coco_unit_images": 2, **cfg}), RuntimeConfig(),
                     {"data": artifact}, out)
    return body, out


def _samples(out: Path, split: str | None = None) -> list:
    return list(iter_samples([p for s in ([split] if split else ["train", "val"]) for p in list_shards(out, s)]))


def test_coco_sources_are_sharded_with_the_source_masks(tmp_path):
    train = _coco(tmp_path / "coco", "instances_train", [1, 2, 3, 4])
    val = _coco(tmp_path / "coco", "instances_val", [5, 6])
    body, out = _run(tmp_path, {"coco_sources": [_source(train, "train", "tr"), _source(val, "val", "va")]},
                     target_size=160)
    assert body["splits"]["train"]["samples"] == 4 and body["splits"]["val"]["samples"] == 2
    assert body["inputs"] == 3  # units of 2 images
    assert body["annotations"] == 24 and body["rejected"] == [] and body["repaired"] == []
    source = {f"{p}_{i['id']}": (i, [a for a in d["annotations"] if a["image_id"] == i["id"]])
              for p, path in (("tr", train), ("va", val)) for d in [json.loads(path.read_text())] for i in d["images"]}
    assert [s.key for s in _samples(out)] == ["tr_1", "tr_2", "tr_3", "tr_4", "va_5", "va_6"]
    for sample in _samples(out):
        info, anns = source[sample.key]
        assert max(sample.hw) == 160 and (sample.meta["original_width"], sample.meta["original_height"]) == (
            info["width"], info["height"])
        sx, sy = sample.hw[1] / info["width"], sample.hw[0] / info["height"]
        for ann, mask, src in zip(sample.annotations, sample.masks(), anns, strict=True):
            assert ann["id"] == src["id"] and ann["category_id"] == src["category_id"]
            seg = src["segmentation"]
            rles = mask_utils.frPyObjects(seg, info["height"], info["width"]) if isinstance(seg, list) else [seg]
            original = mask_utils.decode(mask_utils.merge(rles))
            reference = np.asarray(Image.fromarray(original * 255).resize(sample.hw[::-1], Image.NEAREST)) > 0
            assert (mask & reference).sum() / (mask | reference).sum() >= 0.9
            np.testing.assert_allclose(ann["bbox"], mask_utils.toBbox(ann["segmentation"]))
            np.testing.assert_allclose(ann["bbox"], np.multiply(src["bbox"], [sx, sy, sx, sy]), atol=2.0)
            x, y = ann["point_coords"][0]
            assert mask[int(y), int(x)], "the prompt point lies on its mask"


def test_lvis_names_images_by_coco_url(tmp_path):
    path = _coco(tmp_path / "lvis", "lvis_v1_val", [1, 3])
    data = json.loads(path.read_text())
    for info in data["images"]:
        info["coco_url"] = f"http://images.cocodataset.org/val2017/{info.pop('file_name')}"
    for ann in data["annotations"]:
        del ann["iscrowd"]
    path.write_text(json.dumps(data))
    body, out = _run(tmp_path, {"coco_sources": [_source(path)]}, val_fraction=0.0)
    assert [s.key for s in _samples(out, "train")] == ["lvis-v1-val_1", "lvis-v1-val_3"]
    assert body["annotations"] == 8 and body["rejected"] == []


def _bad_source(root: Path) -> Path:
    """Images 1..3 good; image-level and annotation-level faults around them; repairs on image 1."""
    images_dir = root / "images"
    images_dir.mkdir(parents=True)
    _photo(120, 90, 0).save(images_dir / "wrong_size.jpg")
    (images_dir / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 not a jpeg")
    bad_images = [
        {"id": 10, "width": 100, "height": 80, "file_name": "missing.jpg"},
        {"id": 11, "width": 100, "height": 80, "file_name": "wrong_size.jpg"},
        {"id": 12, "width": 100, "height": 80, "file_name": "corrupt.jpg"},
        {"id": 13, "width": 100, "height": 80, "file_name": "../escape.jpg"},
        {"id": 14, "width": 100, "file_name": "img_1.jpg"},
        {"id": 15, "width": 100, "height": 80, "file_name": "img_1.jpg"},
        {"id": 15, "width": 100, "height": 80, "file_name": "img_3.jpg"},
    ]
    w, h = SIZES[0]
    full = np.asfortranarray(np.zeros((h, w), np.uint8))
    empty = mask_utils.encode(full)["counts"].decode()
    short = mask_utils.frPyObjects({"size": [h, w], "counts": [5, 20]}, h, w)["counts"].decode()
    inner = _rect(100, 60, 200, 150)

    def ann(ann_id, image_id=1, **fields):
        return {"id": ann_id, "image_id": image_id, "category_id": 1, "iscrowd": 0, "segmentation": [inner],
                "bbox": [100.0, 60.0, 100.0, 90.0], **fields}

    bad_anns = [
        ann(901, segmentation=[[10, 10, 50, 10, 50, 40, 10]]),  # odd coordinate count
        ann(902, segmentation=[[10, 10, 50, 10]]),  # two points
        ann(903, segmentation=[[10, 10, 20, 20, 30, 30]]),  # collinear
        ann(904, segmentation=[_rect(400, 300, 450, 350)]),  # outside the 320x240 image
        ann(905, category_id=99),
        ann(906, category_id=None),
        ann(907, image_id=77),
        ann(101),  # duplicate of image 1's second annotation id
        ann(908, segmentation={"size": [h, w], "counts": empty}),
        ann(909, segmentation={"size": [h + 1, w], "counts": empty}),
        ann(910, segmentation={"size": [h, w], "counts": short}),
        ann(911, segmentation="not a mask"),
        ann(912, segmentation=[[10, 10, 50, float("nan"), 50, 40]]),
        {"image_id": 1, "category_id": 1, "segmentation": [inner]},  # no id
        # repaired (kept):
        ann(950, bbox=[float("nan"), 0, 10, 10]),
        ann(951, bbox=[100.0, 60.0, -100.0, 90.0]),
        ann(952, bbox=[10.0, 10.0, 30.0, 30.0]),  # another object's box
        ann(953, segmentation=[_rect(250, 180, 330, 250)], bbox=[250.0, 180.0, 70.0, 60.0]),  # clipped polygon
        ann(954, bbox=None),
        ann(955, bbox=[100.0, 60.0, 100.0, 90.0]),  # consistent: neither rejected nor repaired
    ]
    return _coco(root, "bad", [1, 2, 3], bad_images, bad_anns)


def test_every_bad_coco_input_is_rejected_with_its_reason(tmp_path):
    path = _bad_source(tmp_path / "bad")
    body, out = _run(tmp_path, {"coco_sources": [_source(path, "train")]}, max_reject_ratio=0.9)
    images = {r["key"]: r["reason"] for r in body["rejected"] if "annotation" not in r}
    assert images.pop("bad_10").startswith("missing image file")
    assert images.pop("bad_11") == "image is 120x90 but the JSON says 100x80"
    assert images.pop("bad_12").startswith("corrupt image")
    assert "escapes the images directory" in images.pop("bad_13")
    assert images.pop("images[7]") == "malformed image record: width 100, height None"
    assert images.pop("bad_15") == "duplicate image id 15: 2 records"
    assert len([r for r in body["rejected"] if r["key"] == "bad_15"]) == 2
    assert images == {}
    anns = {r["annotation"]: r["reason"] for r in body["rejected"] if "annotation" in r}
    assert anns.pop(901) == "polygon with an odd number of coordinates (7): it does not close"
    assert anns.pop(902) == "polygon with 2 points: it needs 3 to close"
    assert anns.pop(903) == "polygon encloses no area (its points are collinear)"
    assert anns.pop(904).startswith("annotation outside the 320x240 image")
    assert anns.pop(905) == "category id 99 not in categories"
    assert anns.pop(906) == "category id None not in categories"
    assert anns.pop(907) == "image id 77 not in images"
    assert anns.pop(101) == "duplicate annotation id 101: the first is kept"
    assert anns.pop(908) == "empty mask"
    assert anns.pop(909).startswith("RLE size [241, 320] does not match the image size [240, 320]")
    assert anns.pop(910) == "undecodable RLE: its runs cover 25 pixels, not the 320x240 image's 76800"
    assert anns.pop(911).startswith("malformed annotation: segmentation str")
    assert anns.pop(912) == "polygon with non-numeric or non-finite coordinates"
    assert anns.pop("annotations[25]") == "malformed annotation: no id"
    assert anns == {}
    repaired = {r["annotation"]: r["reason"] for r in body["repaired"]}
    assert "NaN" in repaired.pop(950) and "negative or zero size" in repaired.pop(951)
    assert "disagrees with its mask's box" in repaired.pop(952)
    assert repaired.pop(953) == "polygon extends outside the 320x240 image: clipped to it"
    assert "is not [x, y, w, h]" in repaired.pop(954) and repaired == {}
    samples = {s.key: s for s in _samples(out, "train")}
    assert list(samples) == ["bad_1", "bad_2", "bad_3"]
    kept = [a["id"] for a in samples["bad_1"].annotations]
    assert kept == [100, 101, 102, 103, 950, 951, 952, 953, 954, 955]
    box = samples["bad_1"].annotations[kept.index(953)]["bbox"]
    assert box[0] + box[2] <= samples["bad_1"].hw[1] and box[1] + box[3] <= samples["bad_1"].hw[0]


def _crowd_source(root: Path) -> Path:
    path = _coco(root, "crowd", [1, 2])
    data = json.loads(path.read_text())
    w, h = SIZES[1]
    crowd = np.zeros((h, w), np.uint8)
    crowd[10:60, 20:120] = 1
    counts, value, run = [], 0, 0
    for pixel in crowd.flatten(order="F"):  # uncompressed RLE, as COCO stores crowds
        if pixel != value:
            counts.append(run)
            value, run = pixel, 0
        run += 1
    counts.append(run)
    data["annotations"].append({"id": 999, "image_id": 2, "category_id": 1, "iscrowd": 1, "bbox": [20, 10, 100, 50],
                                "segmentation": {"size": [h, w], "counts": [int(c) for c in counts]}})
    path.write_text(json.dumps(data))
    return path


@pytest.mark.parametrize("policy", ["skip", "as_mask", "reject_image"])
def test_crowd_policy(tmp_path, policy):
    path = _crowd_source(tmp_path / "crowd")
    body, out = _run(tmp_path, {"coco_sources": [_source(path, "train")]}, crowd=policy, max_reject_ratio=0.5)
    samples = {s.key: s for s in _samples(out, "train")}
    if policy == "reject_image":
        assert list(samples) == ["crowd_1"]
        assert body["rejected"] == [{"source": str(path), "key": "crowd_2",
                                     "reason": "crowd annotations [999] (shard.crowd = reject_image)"}]
        return
    ids = [a["id"] for a in samples["crowd_2"].annotations]
    assert body["crowd_skipped"] == (1 if policy == "skip" else 0) and body["rejected"] == []
    assert ids == ([200, 201, 202, 203] if policy == "skip" else [200, 201, 202, 203, 999])
    if policy == "as_mask":
        crowd = samples["crowd_2"].annotations[-1]
        assert crowd["iscrowd"] == 1
        np.testing.assert_allclose(crowd["bbox"], np.multiply([20, 10, 100, 50], 256 / 300), atol=1.5)


@pytest.fixture(scope="module")
def bench(tmp_path_factory) -> dict:
    cfg = DataConfig(num_train=4, num_val=2, images_per_tar=2, min_side=200, max_side=320, objects_per_image=(2, 3))
    return write_benchmark(tmp_path_factory.mktemp("bench"), cfg)


def test_mixed_sa1b_and_coco_input_is_deterministic(tmp_path, bench):
    coco = _coco(tmp_path / "coco", "mine", [1, 2, 3, 4])
    data = {"sa1b_dir": bench["sa1b_dir"], "coco_sources": [_source(coco, "auto")]}
    one, out = _run(tmp_path, data, "one", val_fraction=0.5)
    two, _ = _run(tmp_path, data, "two", val_fraction=0.5, workers=2)
    assert one["splits"] == two["splits"] and one["inputs"] == 3 + 2  # SA-1B tars + COCO units
    keys = [s.key for s in _samples(out)]
    assert len(keys) == len(set(keys)) == 4 + 2 + 4
    held_out = {f"mine_{i}" for i in range(1, 5) if id_fraction(f"mine_{i}", "val") < 0.5}
    assert {k for k in keys if k.startswith("mine_")} == {"mine_1", "mine_2", "mine_3", "mine_4"}
    assert {s.key for s in _samples(out, "val")} == {"sa_10000001", "sa_10000002"} | held_out
    assert one["rejected"] == [] and one["repaired"] == []


def test_resume_after_an_interrupted_unit(tmp_path, monkeypatch):
    coco = _coco(tmp_path / "coco", "resume", [1, 2, 3, 4, 5, 6])
    data = {"coco_sources": [_source(coco, "train")]}
    reference, _ = _run(tmp_path, data, "reference")
    convert, converted = coco_units.CocoUnit._convert, []

    def interrupted(self, key, info, annotations):
        if key == "resume_5":
            raise KeyboardInterrupt
        return convert(self, key, info, annotations)

    def counted(self, key, info, annotations):
        converted.append(key)
        return convert(self, key, info, annotations)

    monkeypatch.setattr(coco_units.CocoUnit, "_convert", interrupted)
    with pytest.raises(KeyboardInterrupt):
        _run(tmp_path, data, "killed")
    parts = tmp_path / "killed" / shard.PARTS
    assert sorted(p.name for p in parts.iterdir()) == ["000000.json", "000000.train.tar", "000001.json",
                                                        "000001.train.tar"]  # unit 2 left nothing behind
    monkeypatch.setattr(coco_units.CocoUnit, "_convert", counted)
    resumed, _ = _run(tmp_path, data, "killed")
    assert converted == ["resume_5", "resume_6"] and resumed["splits"] == reference["splits"]


def test_embedded_coco_files_through_data_and_shard_stages(tmp_path):
    smoke = load_profile("smoke").data
    bench = write_benchmark(tmp_path / "bench", smoke)
    sources = (f"[{{annotations: {bench['coco_train']}, images: {bench['coco_images']}, split: train}}, "
               f"{{annotations: {bench['coco_val']}, images: {bench['coco_images']}, split: val}}]")
    overrides = parse_overrides([f"data.coco_sources={sources}", f"runtime.work_dir={tmp_path / 'runs'}"])
    cfg = load_profile("smoke", overrides)
    flow_cfg = pipeline_config("smoke", {"runtime": {"work_dir": str(tmp_path / "runs")}},
                               coco_sources=[s.model_dump() for s in cfg.data.coco_sources])
    assert flow_cfg == cfg
    results = run_dag(cfg, stages=["data", "shard"])
    data, (artifact, _) = results["data"][0].manifest, results["shard"]
    assert data["sa1b_dir"] is None and data["coco_train"] == bench["coco_train"]
    assert (data["coco_val"], data["coco_images"]) == (bench["coco_val"], bench["coco_images"])
    body = artifact.manifest
    coco = {s: json.loads(Path(bench[f"coco_{s}"]).read_text()) for s in ("train", "val")}
    assert body["splits"]["train"]["samples"] == smoke.num_train and body["splits"]["val"]["samples"] == smoke.num_val
    assert body["annotations"] + body["dropped_masks"] == sum(len(c["annotations"]) for c in coco.values())
    assert body["rejected"] == [] and body["repaired"] == []
    by_id = {a["id"]: a for c in coco.values() for a in c["annotations"]}
    ious = []
    for sample in iter_samples(list_shards(artifact.path, "train") + list_shards(artifact.path, "val")):
        assert sample.key.startswith(("instances-train_", "instances-val_"))  # the JSONs' stems
        for ann, mask in zip(sample.annotations, sample.masks()):
            original = mask_utils.decode(by_id[ann["id"]]["segmentation"])
            reference = np.asarray(Image.fromarray(original * 255).resize(sample.hw[::-1], Image.NEAREST)) > 0
            ious.append((mask & reference).sum() / (mask | reference).sum())
    assert min(ious) >= 0.9
    items = list(shard_items(list_shards(artifact.path, "val")))  # the evaluate stage's reader
    assert len(items) == smoke.num_val and all(i.points is not None and len(i.points) == len(i.masks) for i in items)
