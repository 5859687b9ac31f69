"""The `edgesam` command: predict writes mask + overlay PNGs; info; argument errors."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from edgesam.cli import main
from edgesam.models.edgesam import build_edgesam, save_edgesam


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


def _read_outputs(out_dir, shape):
    mask = np.asarray(Image.open(out_dir / "coffee_mask.png"))
    over = np.asarray(Image.open(out_dir / "coffee_overlay.png"))
    assert mask.shape == shape[:2] and set(np.unique(mask)) <= {0, 255}
    assert over.shape == shape
    return mask, over


@pytest.mark.parametrize("prompt", [["--point", "300,200"], ["--point", "10,10", "--label", "0"],
                                    ["--box", "100,50,500,350"]])
def test_predict_writes_mask_and_overlay(checkpoint, photo, coffee, tmp_path, prompt, capsys):
    main(["predict", str(photo), *prompt, "--checkpoint", str(checkpoint), "--out", str(tmp_path)])
    mask, over = _read_outputs(tmp_path, coffee.shape)
    tinted = np.any(over.astype(int) != np.asarray(Image.open(photo)).astype(int), axis=-1)
    assert tinted[mask > 0].all()  # every mask pixel is tinted in the overlay
    assert "coffee_overlay.png" in capsys.readouterr().out


def test_predict_with_rpn_box(checkpoint, photo, coffee, tmp_path, capsys):
    from edgesam.models.edgesam import load_edgesam
    from edgesam.models.rpn import build_rpn, save_rpn

    rpn = build_rpn(load_edgesam(checkpoint).image_encoder)
    rpn.objectness.bias.data.fill_(5.0)  # random weights: make every location a confident proposal
    save_rpn(rpn, tmp_path / "rpn.pt")
    main(["predict", str(photo), "--point", "300,200", "--checkpoint", str(checkpoint),
          "--rpn", str(tmp_path / "rpn.pt"), "--out", str(tmp_path / "out")])
    _read_outputs(tmp_path / "out", coffee.shape)
    assert "RPN box" in capsys.readouterr().out


def test_predict_errors_are_clear(checkpoint, photo, tmp_path):
    with pytest.raises(SystemExit, match="image not found"):
        main(["predict", str(tmp_path / "nope.jpg"), "--point", "1,1", "--checkpoint", str(checkpoint),
              "--out", str(tmp_path)])
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"garbage")
    with pytest.raises(SystemExit, match=f"{bad}.*truncated or corrupt"):
        main(["predict", str(photo), "--point", "1,1", "--checkpoint", str(bad), "--out", str(tmp_path)])
    with pytest.raises(SystemExit, match="--rpn .* needs --point"):
        main(["predict", str(photo), "--box", "0,0,9,9", "--checkpoint", str(checkpoint),
              "--rpn", str(bad), "--out", str(tmp_path)])
    with pytest.raises(SystemExit):  # argparse: malformed point
        main(["predict", str(photo), "--point", "1", "--checkpoint", str(checkpoint), "--out", str(tmp_path)])


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
