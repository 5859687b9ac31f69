"""The `edgesam` command: every README command, prompts, backends, folders, everything mode, errors."""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from edgesam.cli import main
from edgesam.models.edgesam import build_edgesam, save_edgesam

README = Path(__file__).resolve().parents[1] / "README.md"


def readme_commands() -> list[str]:
    """The `edgesam ...` lines of the README's command-line block."""
    text = README.read_text()
    block = text[text.index("Command line"):]
    block = block[block.index("```bash") + 7:]
    block = block[:block.index("```")]
    return [line.split("  #")[0].strip() for line in block.splitlines() if line.startswith("edgesam ")]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt") / "student.pt"
    save_edgesam(build_edgesam("repvit_m1", img_size=256), path, stage="test")
    return path


@pytest.fixture(scope="module")
def photo(tmp_path_factory, coffee):
    path = tmp_path_factory.mktemp("img") / "coffee.jpg"
    Image.fromarray(coffee).save(path, quality=95)
    return path


def _read_outputs(out_dir, shape, name="coffee_mask.png"):
    mask = np.asarray(Image.open(out_dir / name))
    over = np.asarray(Image.open(out_dir / "coffee_overlay.png"))
    assert mask.shape == shape[:2] and set(np.unique(mask)) <= {0, 255}
    assert over.shape == shape
    return mask, over


@pytest.mark.parametrize("command", readme_commands())
def test_every_readme_command_runs(command, bundle_256, photo, tmp_path, monkeypatch, capsys):
    import edgesam.data.synth

    (tmp_path / "photos").mkdir()
    Image.open(photo).save(tmp_path / "photos" / "coffee.png")
    Image.open(photo).convert("L").save(tmp_path / "photos" / "grey.jpg")  # greyscale: converted to RGB
    monkeypatch.setattr(edgesam.data.synth, "write_benchmark", lambda out, cfg: {"images": cfg.num_train})
    paths = {"photo.jpg": str(photo), "photos/": str(tmp_path / "photos"), "edgesam.pt": str(bundle_256 / "edgesam.pt"),
             "out/": str(tmp_path / "out"), "/tmp/bench": str(tmp_path / "bench")}
    argv = [paths.get(word, word) for word in shlex.split(command)[1:]]
    main(argv)
    printed = capsys.readouterr().out
    if argv[0] == "predict":
        assert re.search(r"mask .*_mask(_\d)?\.png \(\d+ px, predicted IoU", printed)
    if argv[0] == "everything":
        assert (tmp_path / "out" / "coffee_masks.json").is_file() and (tmp_path / "out" / "coffee_everything.png").is_file()


@pytest.mark.parametrize("prompt", [["--point", "300,200"], ["--point", "10,10", "--label", "0"],
                                    ["--box", "100,50,500,350"]])
def test_predict_writes_mask_and_overlay(checkpoint, photo, coffee, tmp_path, prompt, capsys):
    main(["predict", str(photo), *prompt, "--checkpoint", str(checkpoint), "--out", str(tmp_path)])
    mask, over = _read_outputs(tmp_path, coffee.shape)
    tinted = np.any(over.astype(int) != np.asarray(Image.open(photo)).astype(int), axis=-1)
    assert tinted[mask > 0].all()  # every mask pixel is tinted in the overlay
    assert "coffee_overlay.png" in capsys.readouterr().out


def test_several_boxes_give_a_mask_each_and_backends_agree(bundle_256, photo, coffee, tmp_path):
    for backend in ("torch", "onnx"):
        main(["predict", str(photo), "--box", "100,50,500,350", "--box", "20,20,200,200", "--box", "300,100,590,390",
              "--backend", backend, "--checkpoint", str(bundle_256), "--out", str(tmp_path / backend)])
    for i in range(3):
        torch_mask, onnx_mask = (_read_outputs(tmp_path / k, coffee.shape, f"coffee_mask_{i}.png")[0] > 0
                                 for k in ("torch", "onnx"))
        assert (torch_mask != onnx_mask).mean() < 1e-3


def test_predict_with_an_explicit_rpn_checkpoint(checkpoint, photo, coffee, tmp_path, capsys):
    from edgesam.models.edgesam import load_edgesam
    from edgesam.models.rpn import build_rpn, save_rpn

    rpn = build_rpn(load_edgesam(checkpoint).image_encoder)
    rpn.objectness.bias.data.fill_(5.0)  # random weights: make every location a confident proposal
    save_rpn(rpn, tmp_path / "other_rpn.pt", k=3)
    main(["predict", str(photo), "--point", "300,200", "--rpn", "--rpn-checkpoint", str(tmp_path / "other_rpn.pt"),
          "--checkpoint", str(checkpoint), "--out", str(tmp_path / "out")])
    _read_outputs(tmp_path / "out", coffee.shape)
    assert "RPN box" in capsys.readouterr().out


def test_everything_writes_coco_rle(bundle_256, photo, coffee, tmp_path):
    from pycocotools import mask as mask_utils

    main(["everything", str(photo), "--points-per-side", "4", "--pred-iou-thresh", "0", "--stability-score-thresh", "0",
          "--backend", "onnx", "--checkpoint", str(bundle_256), "--out", str(tmp_path)])
    result = json.loads((tmp_path / "coffee_masks.json").read_text())
    assert (result["height"], result["width"]) == coffee.shape[:2] and result["annotations"]
    first = result["annotations"][0]
    assert mask_utils.decode(first["segmentation"]).sum() == first["area"]
    assert np.asarray(Image.open(tmp_path / "coffee_everything.png")).shape == coffee.shape


@pytest.mark.parametrize("argv, message", [
    (["--point", "1,1"], "image not found"),
    (["--point", "1,1", "--label", "1", "--label", "0"], "2 --label for 1 --point"),
    (["--box", "0,0,9,9", "--rpn"], "--rpn .* needs --point"),
    (["--point", "1,1", "--box", "0,0,9,9", "--box", "1,1,5,5"], "points go with one box"),
    (["--point", "900,10"], r"outside the 600x400 image .*coffee.jpg"),
    (["--point", "1,1", "--rpn"], "--rpn needs the RPN checkpoint: .*rpn.pt not found"),
    (["--point", "1,1", "--backend", "onnx"], "not an EdgeSAM bundle: config.json not found"),
    (["--point", "1,1", "--device", "cuda"], "no CUDA device"),
])
def test_predict_errors_are_clear(checkpoint, photo, tmp_path, argv, message):
    import torch

    if "cuda" in argv and torch.cuda.is_available():
        pytest.skip("this machine has a CUDA device")
    image = str(tmp_path / "nope.jpg") if message == "image not found" else str(photo)
    with pytest.raises(SystemExit, match=message):
        main(["predict", image, *argv, "--checkpoint", str(checkpoint), "--out", str(tmp_path)])


def test_bad_checkpoint_and_malformed_point(photo, tmp_path):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"garbage")
    with pytest.raises(SystemExit, match=f"{bad}.*truncated or corrupt"):
        main(["predict", str(photo), "--point", "1,1", "--checkpoint", str(bad), "--out", str(tmp_path)])
    with pytest.raises(SystemExit):  # argparse: malformed point
        main(["predict", str(photo), "--point", "1", "--checkpoint", str(bad), "--out", str(tmp_path)])


def test_info_entry_point(checkpoint):
    result = subprocess.run([sys.executable, "-c", "from edgesam.cli import main; main()", "info", str(checkpoint)],
                            capture_output=True, text=True, check=True)
    assert "repvit_m1" in result.stdout and "256x256" in result.stdout
    assert "image encoder   5.52 M" in result.stdout and "mask decoder    4.06 M" in result.stdout
    assert 'meta.stage        "test"' in result.stdout


def test_data_synth_passes_the_profile_data_config(tmp_path, monkeypatch, capsys):
    import types

    from edgesam.config import load_profile

    calls = []
    fake = types.ModuleType("edgesam.data.synth")
    fake.write_benchmark = lambda out_dir, cfg: calls.append((out_dir, cfg)) or {"images": 3}
    monkeypatch.setitem(sys.modules, "edgesam.data.synth", fake)
    main(["data", "synth", "--profile", "smoke", "--out", str(tmp_path)])
    assert calls == [(tmp_path, load_profile("smoke").data)]
    assert '"images": 3' in capsys.readouterr().out
