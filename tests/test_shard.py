"""The shard stage: counts, resizing, validation of bad input, repairs, determinism, resume after a kill."""

from __future__ import annotations

import io
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils

from edgesam.artifacts import ArtifactStore, sha256_file
from edgesam.config import DataConfig, RuntimeConfig, ShardConfig
from edgesam.data.shards import iter_samples, list_shards
from edgesam.data.synth import write_benchmark
from edgesam.data.sharding import RejectRatioError
from pipelines import shard

DATA = DataConfig(num_train=8, num_val=4, images_per_tar=2, min_side=200, max_side=320, objects_per_image=(2, 3))
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def bench(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("bench")
    return Path(write_benchmark(out, DATA)["sa1b_dir"])


def _data_artifact(root: Path, sa1b_dir: Path):
    artifact = ArtifactStore(root).artifact("data", "fp")
    artifact.path.mkdir(parents=True, exist_ok=True)
    artifact.commit({"sa1b_dir": str(sa1b_dir)})
    return artifact


def _run(tmp: Path, sa1b_dir: Path, name: str = "out", **cfg) -> tuple[dict, Path]:
    out = tmp / name
    out.mkdir(parents=True, exist_ok=True)
    body = shard.run(ShardConfig(**{"workers": 1, **cfg}), RuntimeConfig(), {"data": _data_artifact(tmp, sa1b_dir)}, out)
    return body, out


def _source_records(sa1b_dir: Path) -> dict[str, tuple[dict, bytes]]:
    records = {}
    for path in sorted(sa1b_dir.rglob("sa_*.tar")):
        with tarfile.open(path) as tar:
            members = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}
        for name, payload in members.items():
            if name.endswith(".json"):
                records[name[:-5]] = (json.loads(payload), members[name[:-5] + ".jpg"])
    return records


def test_counts_resizing_and_scaled_annotations(bench, tmp_path):
    body, out = _run(tmp_path, bench, max_count=5)
    assert body["splits"]["train"]["samples"] == 8 and body["splits"]["val"]["samples"] == 4
    assert [s["samples"] for s in body["splits"]["train"]["shards"]] == [5, 3]
    assert body["rejected"] == [] and not (out / shard.PARTS).exists()
    for info in body["splits"]["train"]["shards"]:
        assert sha256_file(out / info["path"]) == info["sha256"]
    source = _source_records(bench)
    ious = []
    for sample in iter_samples(list_shards(out, "train") + list_shards(out, "val")):
        record, _ = source[sample.key]
        h, w = record["image"]["height"], record["image"]["width"]
        assert max(sample.hw) == 256 and sample.meta["original_height"] == h and sample.meta["original_width"] == w
        assert (sample.meta["height"], sample.meta["width"]) == sample.hw
        by_id = {a["id"]: a for a in record["annotations"]}
        masks = sample.masks()
        assert len(masks) == len(sample.annotations) == len(by_id)
        for ann, mask in zip(sample.annotations, masks):
            original = mask_utils.decode(by_id[ann["id"]]["segmentation"])
            reference = np.asarray(Image.fromarray(original * 255).resize(sample.hw[::-1], Image.NEAREST)) > 0
            ious.append((mask & reference).sum() / (mask | reference).sum())
            sx, sy = sample.hw[1] / w, sample.hw[0] / h
            np.testing.assert_allclose(ann["bbox"], mask_utils.toBbox(ann["segmentation"]))
            scaled = np.multiply(by_id[ann["id"]]["bbox"], [sx, sy, sx, sy])
            np.testing.assert_allclose(ann["bbox"][:2], scaled[:2], atol=2.0)
            np.testing.assert_allclose(np.add(ann["bbox"][:2], ann["bbox"][2:]), scaled[:2] + scaled[2:], atol=2.0)
            x, y = ann["point_coords"][0]
            ox, oy = by_id[ann["id"]]["point_coords"][0]
            assert (x, y) == pytest.approx((ox * sx, oy * sy), abs=1e-3)
    # Resized masks agree with an independent nearest-neighbour resize of the source masks
    # (thin parts differ most at their edges).
    assert min(ious) > 0.6 and np.mean(ious) > 0.9


def test_same_input_gives_byte_identical_shards_across_worker_counts(bench, tmp_path):
    one, _ = _run(tmp_path, bench, "one", max_count=5)
    two, _ = _run(tmp_path, bench, "two", max_count=5, workers=2)
    assert one["splits"] == two["splits"]
    ray = pytest.importorskip("ray")
    # an initialized Ray, as a joined cluster would be; "local": never one left recorded in /tmp/ray
    ray.init(address="local", num_cpus=2, include_dashboard=False, object_store_memory=80 * 1024**2)
    try:
        on_ray, _ = _run(tmp_path, bench, "ray", max_count=5, workers=2)
    finally:
        ray.shutdown()
    assert on_ray["splits"] == one["splits"]


def _jpeg(size=(40, 30)) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.full((size[1], size[0], 3), 120, np.uint8)).save(buffer, format="JPEG")
    return buffer.getvalue()


def _record(key: str, size=(40, 30), rle_size=None) -> bytes:
    w, h = size
    mask = np.zeros((h, w), np.uint8, order="F")
    mask[5:20, 5:25] = 1
    rle = mask_utils.encode(mask)
    segmentation = {"size": rle_size or [h, w], "counts": rle["counts"].decode()}
    ann = {"id": 1, "segmentation": segmentation, "bbox": [5, 5, 20, 15], "area": 300, "predicted_iou": 0.9,
           "stability_score": 0.95, "point_coords": [[10.0, 10.0]], "crop_box": [0, 0, w, h]}
    info = {"image_id": int(key[3:]), "width": w, "height": h, "file_name": f"{key}.jpg"}
    return json.dumps({"image": info, "annotations": [ann]}).encode()


def _add(tar: tarfile.TarFile, name: str, payload: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(payload)
    tar.addfile(info, io.BytesIO(payload))


def _bad_inputs(root: Path) -> Path:
    """A tar with good samples and one of each kind of bad input, and a truncated tar."""
    sa1b = root / "bad_sa1b"
    sa1b.mkdir()
    with tarfile.open(sa1b / "sa_000000.tar", "w") as tar:
        for key in ("sa_1", "sa_2"):
            _add(tar, f"{key}.jpg", _jpeg())
            _add(tar, f"{key}.json", _record(key))
        _add(tar, "sa_3.jpg", b"\xff\xd8\xff\xe0 this is not a jpeg")
        _add(tar, "sa_3.json", _record("sa_3"))
        _add(tar, "sa_4.jpg", _jpeg())
        _add(tar, "sa_4.json", b'{"image": {"image_id": 4, "width": 40')
        _add(tar, "sa_5.jpg", _jpeg())
        _add(tar, "sa_6.jpg", _jpeg())
        _add(tar, "sa_6.json", _record("sa_6", rle_size=[60, 80]))
        _add(tar, "../sa_7.jpg", _jpeg())
        link = tarfile.TarInfo("sa_8.jpg")
        link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
        tar.addfile(link)
    with tarfile.open(sa1b / "sa_000001.tar", "w") as tar:
        for key in ("sa_10", "sa_11"):
            _add(tar, f"{key}.jpg", _jpeg())
            _add(tar, f"{key}.json", _record(key))
    with tarfile.open(sa1b / "sa_000001.tar") as tar:
        cut = tar.getmember("sa_11.jpg").offset_data + 100  # in the middle of a member's data
    data = (sa1b / "sa_000001.tar").read_bytes()
    (sa1b / "sa_000001.tar").write_bytes(data[:cut])
    return sa1b


def test_bad_inputs_are_rejected_with_reasons(tmp_path):
    sa1b = _bad_inputs(tmp_path)
    body, out = _run(tmp_path, sa1b, max_reject_ratio=0.95, val_fraction=0.0)
    reasons = {r["key"]: r["reason"] for r in body["rejected"]}
    assert reasons["sa_3"].startswith("corrupt JPEG")
    assert reasons["sa_4"].startswith("malformed JSON")
    assert reasons["sa_5"] == "image without its JSON"
    assert reasons["sa_6"].startswith("RLE size [60, 80] does not match the image size [30, 40]")
    assert "escapes the directory" in reasons["../sa_7.jpg"]
    assert "not a regular file" in reasons["sa_8.jpg"]
    truncated = [r for r in body["rejected"] if r["source"].endswith("sa_000001.tar")]
    assert any("truncated" in r["reason"] for r in truncated)
    kept = [s.key for s in iter_samples(list_shards(out, "train"))]
    assert kept == ["sa_1", "sa_2", "sa_10"]
    assert body["splits"]["val"]["samples"] == 0


def test_sa1b_repairs_are_listed(tmp_path):
    w, h = 64, 48
    mask = np.zeros((h, w), np.uint8, order="F")
    mask[8:30, 10:40] = 1
    rle = {"size": [h, w], "counts": mask_utils.encode(mask)["counts"].decode()}
    good = {"id": 1, "segmentation": rle, "bbox": [10.0, 8.0, 30.0, 22.0], "area": 660, "point_coords": [[20.0, 15.0]]}
    anns = [good, {**good, "id": 2, "bbox": [math.nan, 8.0, 30.0, 22.0]}, {**good, "id": 3, "bbox": [10, 8, -30, 22]},
            {**good, "id": 4, "point_coords": []}, {**good, "id": 5, "bbox": [0, 0, 64, 48], "point_coords": [[99, 5]]}]
    sa1b = tmp_path / "sa1b" / "train"
    sa1b.mkdir(parents=True)
    with tarfile.open(sa1b / "sa_000000.tar", "w") as tar:
        _add(tar, "sa_1.jpg", _jpeg((w, h)))
        record = {"image": {"image_id": 1, "width": w, "height": h, "file_name": "sa_1.jpg"}, "annotations": anns}
        _add(tar, "sa_1.json", json.dumps(record).encode())
    body, out = _run(tmp_path, tmp_path / "sa1b", target_size=128)
    reasons = [(r["key"], r["annotation"], r["reason"].split(":")[0]) for r in body["repaired"]]
    assert reasons == [
        ("sa_1", 2, "bbox [nan, 8.0, 30.0, 22.0] has NaN or infinite values"),
        ("sa_1", 3, "bbox [10, 8, -30, 22] has a negative or zero size"),
        ("sa_1", 4, "point_coords [] missing or outside the image"),
        ("sa_1", 5, "bbox [0, 0, 64, 48] disagrees with its mask's box [10.0, 8.0, 30.0, 22.0]"),
        ("sa_1", 5, "point_coords [[99, 5]] missing or outside the image"),
    ]
    (sample,) = iter_samples(list_shards(out, "train"))
    boxes = {a["id"]: a["bbox"] for a in sample.annotations}
    assert all(box == boxes[1] == [20.0, 16.0, 60.0, 44.0] for box in boxes.values())
    x, y = sample.annotations[3]["point_coords"][0]
    assert sample.masks([3])[0][int(y), int(x)]


def test_reject_ratio_failure(tmp_path):
    sa1b = _bad_inputs(tmp_path)
    with pytest.raises(RejectRatioError, match=r"rejected \(\d+\.\d% > max_reject_ratio 5.0%\).*corrupt JPEG"):
        _run(tmp_path, sa1b, max_reject_ratio=0.05)
    assert not list((tmp_path / "out").glob("*/shard-*.tar"))


def test_subsets_and_flat_input_split(bench, tmp_path):
    ids = tmp_path / "ids.txt"
    ids.write_text("sa_2\n5\nsa_10000002.jpg\n")
    body, out = _run(tmp_path, bench, "ids", subset_ids_file=ids)
    keys = {s.key for split in ("train", "val") for s in iter_samples(list_shards(out, split))}
    assert keys == {"sa_2", "sa_5", "sa_10000002"}
    half, _ = _run(tmp_path, bench, "half", subset_fraction=0.5)
    again, _ = _run(tmp_path, bench, "half2", subset_fraction=0.5)
    assert half["splits"] == again["splits"] and 0 < half["splits"]["train"]["samples"] < 8
    flat = tmp_path / "flat"
    flat.mkdir()
    for i, path in enumerate(sorted(bench.rglob("sa_*.tar"))):
        shutil.copy(path, flat / f"sa_{i:06d}.tar")
    split, _ = _run(tmp_path, flat, "flat", val_fraction=0.3)
    assert split["splits"]["train"]["samples"] + split["splits"]["val"]["samples"] == 12
    assert split["splits"]["val"]["samples"] > 0


def test_extracted_pairs_directory(bench, tmp_path):
    pairs = tmp_path / "pairs" / "train"
    pairs.mkdir(parents=True)
    with tarfile.open(bench / "train" / "sa_000000.tar") as tar:
        tar.extractall(pairs, filter="data")
    body, out = _run(tmp_path, tmp_path / "pairs")
    assert [s.key for s in iter_samples(list_shards(out, "train"))] == ["sa_1", "sa_2"]


KILL_SCRIPT = textwrap.dedent("""
    import sys
    from pathlib import Path
    from edgesam.artifacts import ArtifactStore
    from edgesam.config import RuntimeConfig, ShardConfig
    from pipelines import shard
    data = ArtifactStore(sys.argv[1]).artifact("data", "fp")
    shard.run(ShardConfig(workers=1, target_size=1024, max_count=5), RuntimeConfig(), {"data": data}, Path(sys.argv[2]))
""")


def test_kill_and_rerun_gives_the_same_shards(bench, tmp_path):
    reference, _ = _run(tmp_path, bench, "reference", target_size=1024, max_count=5)
    out = tmp_path / "killed"
    out.mkdir()
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-c", KILL_SCRIPT, str(tmp_path), str(out)], env=env)
    deadline = time.time() + 120
    while not list((out / shard.PARTS).glob("*.json")) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL, "the stage finished before it could be killed"
    done = list((out / shard.PARTS).glob("*.json"))
    assert 0 < len(done) < 6
    assert not list(out.glob("*/shard-*.tar")), "an interrupted run must leave no complete-looking shard"
    resumed, _ = _run(tmp_path, bench, "killed", target_size=1024, max_count=5)
    assert resumed["splits"] == reference["splits"]


def test_resize_rounding_matches_segment_anything():
    from segment_anything.utils.transforms import ResizeLongestSide

    from edgesam.data.annotations import longest_side_shape

    for h, w in [(1500, 2250), (2250, 1500), (333, 500), (640, 384), (257, 255), (1024, 1024)]:
        for size in (1024, 256, 64):
            assert longest_side_shape(h, w, size) == ResizeLongestSide.get_preprocess_shape(h, w, size)
