"""The `edgesam` command: every command line the README and docs/ show (each parses; the deploy
page's `edgesam` commands run), prompts, backends, folders, everything mode, errors."""

from __future__ import annotations

import argparse
import ast
import importlib
import json
import re
import runpy
import shlex
import subprocess
import sys
import tomllib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from edgesam.cli import main
from edgesam.models.edgesam import build_edgesam, save_edgesam
from flows.nightly import REGRESSED

REPO = Path(__file__).resolve().parents[1]
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
SHELL_BLOCKS = {"", "bash", "sh", "shell", "console"}
FIRST_PARTY = ("edgesam", "pipelines", "flows", "benchmarks")
CONSOLE_SCRIPTS = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
ENV_ASSIGNMENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*=")
# Prefect event and resource names, not modules: the nightly flow's regression event on
# `edgesam.model.<name>`
PREFECT_EVENT_NAMES = {REGRESSED, "edgesam.model"}
SEPARATORS, REDIRECTS = {"&", "&&", "|", "||", ";"}, {">", ">>", "<", "2>", "&>"}


def shell_commands(path: Path) -> list[list[str]]:
    """Every command of the shell code blocks of a Markdown page, as words: lines continued with
    `\\` or inside a quote joined, comments and redirections dropped, `a & b` / `a && b` split."""
    commands, info, pending = [], None, ""
    for line in path.read_text().splitlines():
        if line.lstrip().startswith("```"):
            assert info is None or not pending, f"{path.name}: unterminated command {pending!r}"
            info = line.strip()[3:].strip() if info is None else None
            continue
        if info not in SHELL_BLOCKS:
            continue
        pending += line.rstrip().removesuffix("\\") + "\n"
        if line.rstrip().endswith("\\"):
            continue
        lexer = shlex.shlex(pending, posix=True, punctuation_chars=True)
        lexer.whitespace_split, lexer.commenters = True, "#"
        try:
            words = list(lexer)
        except ValueError:  # a quote spans lines: read on
            continue
        pending = ""
        commands.extend(_split_commands(words))
    return commands


def _split_commands(words: list[str]) -> list[list[str]]:
    """`a & b`, `a && b`, `a | b` as two commands; `> file` dropped."""
    commands, current, skip = [], [], False
    for word in words:
        if word in SEPARATORS:
            commands, current = commands + [current], []
        elif word in REDIRECTS or skip:
            skip = word in REDIRECTS
        else:
            current.append(word)
    return [c for c in commands + [current] if c]


def project_command(words: list[str]) -> tuple[str, str, list[str]] | None:
    """(how to run it, what, argv) for a command of this project: `python -m <first-party module>`,
    a console script (pyproject.toml), a `scripts/*.sh` that forwards to a module, `prefect ...`;
    None for other tools (ray, tensorboard, pytest, ...)."""
    while words and ENV_ASSIGNMENT.match(words[0]):
        words = words[1:]
    if not words:
        return None
    program = words[0].rsplit("/", 1)[-1]  # `.venv/bin/edgesam` is `edgesam`; the folder `edgesam/` is none
    if program in ("python", "python3") and words[1:2] == ["-m"]:
        kind, target, argv = "module", words[2], words[3:]
    elif program in CONSOLE_SCRIPTS:
        kind, target, argv = "script", CONSOLE_SCRIPTS[program], words[1:]
    elif program == "prefect":
        return "prefect", "prefect", words[1:]
    elif words[0].removeprefix("./").startswith("scripts/"):
        forwarded = re.search(r'exec python -m (\S+) "\$@"', (REPO / words[0]).read_text())
        assert forwarded, f"{words[0]} forwards its arguments to no module"
        kind, target, argv = "module", forwarded.group(1), words[1:]
    else:
        return None
    return (kind, target, argv) if target.split(".")[0] in FIRST_PARTY else None


DOCUMENTED = [(doc.name, words) for doc in DOCS for words in shell_commands(doc) if project_command(words)]


class Parsed(Exception):
    """Raised where a documented command would start its work: its arguments parsed."""


def _stop_after_parsing(monkeypatch) -> None:
    import prefect

    parse_args = argparse.ArgumentParser.parse_args

    def parse_then_stop(self, args=None, namespace=None):
        raise Parsed(parse_args(self, args, namespace))

    def serve_then_stop(*deployments, **options):
        raise Parsed(deployments)

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", parse_then_stop)
    monkeypatch.setattr(prefect, "serve", serve_then_stop)  # `python -m flows.serve` takes no arguments


def check_prefect_command(argv: list[str]) -> None:
    """Parse with Prefect's own CLI parser (no command runs); `deployment run` also needs a served
    deployment and parameters its flow accepts, with `--param` values read as the CLI reads them."""
    from prefect.cli._app import _app
    from prefect.cli._utilities import load_json_key_values
    from prefect.flows import load_flow_from_entrypoint

    from flows.serve import deployments

    _, bound, _ = _app.parse_args(argv, exit_on_error=False, print_error=False)
    if argv[:2] != ["deployment", "run"]:
        return
    served = {f"{d.flow_name}/{d.name}": d for d in deployments()}
    deployment = served[bound.arguments["name"]]
    parameters = load_json_key_values(bound.arguments.get("params", []), "parameter")
    load_flow_from_entrypoint(deployment.entrypoint).validate_parameters({**deployment.parameters, **parameters})


@pytest.mark.timeout(120)  # a command that never reaches its parser runs for real: this fails it
@pytest.mark.filterwarnings("ignore:.*found in sys.modules:RuntimeWarning")
@pytest.mark.parametrize("doc, words", DOCUMENTED, ids=[f"{d}: {' '.join(w)[:70]}" for d, w in DOCUMENTED])
def test_every_documented_command_parses(doc, words, monkeypatch, capsys):
    kind, target, argv = project_command(words)
    if kind == "prefect":
        check_prefect_command(argv)
        return
    _stop_after_parsing(monkeypatch)
    monkeypatch.syspath_prepend(str(REPO))  # benchmarks/ is run from the checkout, not installed
    monkeypatch.setattr(sys, "argv", [target, *argv])
    with pytest.raises((Parsed, SystemExit)) as stopped:
        if kind == "module":
            runpy.run_module(target, run_name="__main__", alter_sys=True)
        else:
            module, function = target.split(":")
            getattr(importlib.import_module(module), function)()
    if isinstance(stopped.value, SystemExit):  # argparse: --help exits 0, a bad argument 2
        assert stopped.value.code == 0, f"{doc}: {' '.join(words)}\n{capsys.readouterr().err}"


def documented_names(path: Path) -> list[str]:
    """The first-party names a page refers to: `edgesam.x.y` in inline code (file names such as
    `edgesam.pt` left out) and every name its Python blocks import."""
    text = path.read_text()
    names = re.findall(r"`((?:edgesam|pipelines|flows|benchmarks)(?:\.[A-Za-z_]\w*)+)", text)
    for block in re.findall(r"```python\n(.*?)```", text, flags=re.S):
        for node in ast.walk(ast.parse(block)):
            if isinstance(node, ast.ImportFrom):
                names += [f"{node.module}.{alias.name}" for alias in node.names]
    files = (".pt", ".py", ".onnx", ".json", ".md", ".yaml", ".egg")
    return [n for n in dict.fromkeys(names) if not n.endswith(files) and n not in PREFECT_EVENT_NAMES]


@pytest.mark.parametrize("doc", DOCS, ids=[d.name for d in DOCS])
def test_every_documented_module_path_exists(doc, monkeypatch):
    monkeypatch.syspath_prepend(str(REPO))  # benchmarks/ is run from the checkout, not installed
    missing = []
    for name in documented_names(doc):
        parts = name.split(".")
        for split in range(len(parts), 0, -1):
            try:
                found = importlib.import_module(".".join(parts[:split]))
            except ModuleNotFoundError:
                continue
            for attribute in parts[split:]:
                found = getattr(found, attribute, None)
            break
        if found is None:
            missing.append(name)
    assert not missing, f"{doc.name} names what does not exist: {missing}"


def deploy_page_commands() -> list[str]:
    """The `edgesam ...` commands of docs/DEPLOY.md, the page of the command line: each runs."""
    return [shlex.join(words) for words in shell_commands(REPO / "docs" / "DEPLOY.md") if words[0] == "edgesam"]


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


@pytest.mark.parametrize("command", deploy_page_commands())
def test_every_deploy_page_command_runs(command, bundle_256, photo, tmp_path, monkeypatch, capsys):
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
