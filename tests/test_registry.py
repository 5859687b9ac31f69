"""The model registry (`edgesam.eval.registry`, `edgesam models`): versions by content, aliases
that move and keep their history, and bad input refused with the file named."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest
import torch

from edgesam.cli import main
from edgesam.eval.registry import Registry, RegistryError, load_model
from edgesam.models.checkpoint import CheckpointError
from edgesam.models.edgesam import save_edgesam


@pytest.fixture(scope="module")
def checkpoints(student_256, tmp_path_factory) -> tuple[Path, Path]:
    """Two checkpoints of the same architecture with different weights."""
    out = tmp_path_factory.mktemp("checkpoints")
    save_edgesam(student_256, out / "a.pt")
    other = {k: v + 0.01 if v.is_floating_point() else v for k, v in student_256.state_dict().items()}
    save_edgesam(student_256, out / "b.pt")
    state = torch.load(out / "b.pt", weights_only=True)
    state["model"] = other
    torch.save(state, out / "b.pt")
    return out / "a.pt", out / "b.pt"


def test_register_versions_and_moving_aliases(checkpoints, tmp_path: Path) -> None:
    a, b = checkpoints
    registry = Registry(tmp_path / "ledger.sqlite")
    assert registry.versions() == [] and registry.aliased() == []
    first = registry.register(a, "student", ("champion",))
    assert (first.version, first.kind, first.backbone, first.img_size, first.aliases) == (1, "checkpoint",
                                                                                          "repvit_m1", 256,
                                                                                          ("champion",))
    assert registry.register(a, "student").version == 1  # same content and path: the same version
    second = registry.register(b, "student", ("candidate",))
    assert second.version == 2 and second.digest != first.digest
    assert [(m.label, m.aliases) for m in registry.aliased()] == [("student v1", ("champion",)),
                                                                  ("student v2", ("candidate",))]
    promoted = registry.move_alias("champion", "student")  # the latest version by default
    assert promoted.aliases == ("candidate", "champion")
    assert registry.holder("champion").version == 2 and registry.get("student", 1).aliases == ()
    with sqlite3.connect(registry.path) as db:  # where the alias pointed before stays on record
        assert db.execute("SELECT alias, version FROM alias_moves ORDER BY rowid").fetchall() == [
            ("champion", 1), ("candidate", 2), ("champion", 2)]


def test_models_command_registers_and_lists(checkpoints, tmp_path: Path, capsys) -> None:
    ledger = str(tmp_path / "ledger.sqlite")
    main(["models", "list", "--ledger", ledger])
    assert "no model registered" in capsys.readouterr().out
    main(["models", "register", str(checkpoints[0]), "--name", "phase2", "--alias", "champion", "--ledger", ledger])
    main(["models", "register", str(checkpoints[1]), "--name", "phase1", "--alias", "candidate", "--ledger", ledger])
    main(["models", "list", "--ledger", ledger])
    lines = capsys.readouterr().out.splitlines()
    assert lines[-3].split()[:4] == ["name", "version", "aliases", "kind"]
    assert [line.split()[:3] for line in lines[-2:]] == [["phase1", "1", "candidate"], ["phase2", "1", "champion"]]
    main(["models", "alias", "champion", "phase1", "--ledger", ledger])
    assert capsys.readouterr().out.splitlines()[-1].split()[:3] == ["phase1", "1", "candidate,champion"]
    with pytest.raises(SystemExit, match="error: .*ledger.sqlite: no night"):  # no nightly run yet
        main(["models", "results", "--ledger", ledger])


def test_bad_input_names_the_file(checkpoints, tmp_path: Path) -> None:
    registry = Registry(tmp_path / "ledger.sqlite")
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"PK\x03\x04 not a checkpoint" * 50)
    with pytest.raises(CheckpointError, match="garbage.pt"):
        registry.register(garbage, "x")
    with pytest.raises(CheckpointError, match="missing.pt"):
        registry.register(tmp_path / "missing.pt", "x")
    with pytest.raises(RegistryError, match="model name 'bad name'"):
        registry.register(checkpoints[0], "bad name")
    with pytest.raises(RegistryError, match="alias 'Champion!'"):
        registry.register(checkpoints[0], "x", ("Champion!",))
    assert registry.versions() == []  # nothing half-registered
    registry.register(checkpoints[0], "x")
    with pytest.raises(RegistryError, match=r"no model 'y' \(registered: x v1\)"):
        registry.move_alias("champion", "y")
    with pytest.raises(SystemExit, match="error: .*garbage.pt"):
        main(["models", "register", str(garbage), "--name", "x", "--ledger", str(registry.path)])


def test_a_file_changed_after_registering_is_refused(checkpoints, tmp_path: Path) -> None:
    path = tmp_path / "student.pt"
    path.write_bytes(checkpoints[0].read_bytes())
    model = Registry(tmp_path / "ledger.sqlite").register(path, "student", ("champion",))
    assert load_model(model).image_encoder is not None
    path.write_bytes(checkpoints[1].read_bytes())
    with pytest.raises(RegistryError, match="student.pt .*changed since it was registered"):
        load_model(model)
