"""The shard reader and SAM preprocessing."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image
from pycocotools import mask as mask_utils
from segment_anything.modeling import MaskDecoder, PromptEncoder, Sam, TwoWayTransformer
from segment_anything.utils.transforms import ResizeLongestSide

from edgesam.data.shards import SampleDataset, iter_samples, list_shards
from edgesam.data.transforms import preprocess, scale_boxes, valid_mask


def _rle(mask: np.ndarray) -> dict:
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": rle["size"], "counts": rle["counts"].decode()}


def _write_shards(directory, num_samples: int, per_shard: int, embedding: bool):
    (directory / "train").mkdir(parents=True)
    rng = np.random.default_rng(0)
    truth = {}
    with wds.ShardWriter(str(directory / "train" / "shard-%06d.tar"), maxcount=per_shard, verbose=0, mtime=0) as sink:
        for i in range(num_samples):
            h, w = 40 + i, 64
            image = rng.integers(0, 255, (h, w, 3), dtype=np.uint8)
            mask = np.zeros((h, w), bool)
            mask[5 : 10 + i, 3:20] = True
            buf = io.BytesIO()
            Image.fromarray(image).save(buf, format="PNG")  # lossless, to compare pixels
            record = {
                "image": {"image_id": i, "width": w, "height": h, "file_name": f"sa_{i}.jpg"},
                "annotations": [{"id": 0, "segmentation": _rle(mask), "bbox": [3, 5, 17, 5 + i], "point_coords": [[10, 7]]}],
            }
            sample = {"__key__": f"sa_{i}", "jpg": buf.getvalue(), "json": json.dumps(record).encode()}
            if embedding:
                emb = io.BytesIO()
                np.save(emb, np.full((4, 2, 2), i, np.float16))
                sample["emb.npy"] = emb.getvalue()
            sink.write(sample)
            truth[f"sa_{i}"] = (image, mask)
    return truth


def test_reader_decodes_images_masks_and_embeddings(tmp_path):
    truth = _write_shards(tmp_path, 7, 3, embedding=True)
    paths = list_shards(tmp_path, "train")
    assert [p.name for p in paths] == ["shard-000000.tar", "shard-000001.tar", "shard-000002.tar"]
    samples = list(iter_samples(paths))
    assert [s.key for s in samples] == [f"sa_{i}" for i in range(7)]
    for i, sample in enumerate(samples):
        image, mask = truth[sample.key]
        np.testing.assert_array_equal(sample.image, image)
        np.testing.assert_array_equal(sample.masks()[0], mask)
        assert sample.masks([]).shape == (0, *image.shape[:2])
        assert sample.embedding.dtype == np.float16 and sample.embedding[0, 0, 0] == i
        assert sample.meta["image_id"] == i
        np.testing.assert_array_equal(sample.boxes()[0], [3, 5, 20, 10 + i])
        np.testing.assert_array_equal(sample.points()[0], [10, 7])
    with pytest.raises(FileNotFoundError, match="val"):
        list_shards(tmp_path, "val")


@pytest.mark.parametrize("per_shard", [1, 4])  # split by shard, and by sample (fewer shards than ranks)
def test_ranks_get_disjoint_complete_parts(tmp_path, per_shard):
    _write_shards(tmp_path, 7, per_shard, embedding=False)
    paths = list_shards(tmp_path, "train")
    parts = [[s.key for s in iter_samples(paths, shuffle=True, seed=3, rank=r, world_size=3)] for r in range(3)]
    assert sorted(sum(parts, [])) == sorted(f"sa_{i}" for i in range(7))
    again = [s.key for s in iter_samples(paths, shuffle=True, seed=3, rank=0, world_size=3)]
    assert again == parts[0]


def test_dataloader_workers_split_the_stream(tmp_path):
    _write_shards(tmp_path, 6, 2, embedding=False)
    dataset = SampleDataset(list_shards(tmp_path, "train"), transform=lambda s: s.key, shuffle=True, seed=1)
    loader = torch.utils.data.DataLoader(dataset, batch_size=None, num_workers=2)
    keys = list(loader)
    assert sorted(keys) == sorted(f"sa_{i}" for i in range(6))
    dataset.set_epoch(1)
    assert sorted(loader) == sorted(keys)


def test_preprocess_matches_segment_anything():
    img_size = 64
    sam = Sam(
        image_encoder=torch.nn.Module(),
        prompt_encoder=PromptEncoder(embed_dim=8, image_embedding_size=(4, 4), input_image_size=(64, 64), mask_in_chans=4),
        mask_decoder=MaskDecoder(transformer_dim=8, transformer=TwoWayTransformer(depth=1, embedding_dim=8, mlp_dim=8, num_heads=1)),
    )
    sam.image_encoder.img_size = img_size
    image = np.random.default_rng(0).integers(0, 255, (50, 90, 3), dtype=np.uint8)
    resized = ResizeLongestSide(img_size).apply_image(image)
    expected = sam.preprocess(torch.as_tensor(resized).permute(2, 0, 1).float()[None])[0]
    x, hw = preprocess(image, img_size)
    assert hw == (36, 64) == resized.shape[:2]
    torch.testing.assert_close(x, expected, rtol=0, atol=0)
    assert torch.all(x[:, 36:] == 0)


def test_valid_mask_and_box_scaling():
    mask = valid_mask((36, 64), 64, grid=4)
    assert mask.shape == (4, 4) and mask[:3].all() and not mask[3:].any()
    assert valid_mask((64, 20), 64).sum() == 64 * 20
    np.testing.assert_allclose(scale_boxes(np.array([[0, 0, 90, 50]]), (50, 90), 64), [[0, 0, 64, 36]], atol=0.5)
