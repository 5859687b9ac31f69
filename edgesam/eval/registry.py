"""The model registry, kept in the ledger's file: named models, their versions, aliases that move.

As in MLflow's model registry, a name has versions (each one file's content, by SHA-256) and an
alias (`champion`, `candidate` or any other) points at one version. Moving an alias appends a
row, so where it pointed before stays on record. Three kinds of model register by path, told
apart by their content: an exported bundle folder (its `edgesam.pt`, checked against
config.json), one of this project's checkpoints (`save_edgesam`), and an official EdgeSAM release
file (`edge_sam.pth`, through `edgesam.models.official`). Nothing here writes into a bundle.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Literal

from segment_anything.modeling import Sam

from edgesam.client.bundle import Bundle
from edgesam.eval.ledger import reading, transaction, utc_now
from edgesam.models.checkpoint import CheckpointError, read_checkpoint
from edgesam.models.edgesam import CHECKPOINT_FORMAT, load_edgesam
from edgesam.models.official import load_official_edgesam, read_official_state
from edgesam.store.files import sha256_of

CHAMPION, CANDIDATE = "champion", "candidate"  # the two aliases the nightly gate compares
OFFICIAL_IMG_SIZE = 1024  # the official release's input size
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
ALIAS = re.compile(r"^[a-z][a-z0-9_-]*$")
Kind = Literal["bundle", "checkpoint", "official"]

SCHEMA = (
    "CREATE TABLE IF NOT EXISTS models (name TEXT NOT NULL, version INTEGER NOT NULL, digest TEXT NOT NULL, "
    "kind TEXT NOT NULL, path TEXT NOT NULL, backbone TEXT NOT NULL, img_size INTEGER NOT NULL, "
    "registered_at TEXT NOT NULL, PRIMARY KEY (name, version))",
    "CREATE TABLE IF NOT EXISTS alias_moves (alias TEXT NOT NULL, name TEXT NOT NULL, version INTEGER NOT NULL, "
    "moved_at TEXT NOT NULL)",
)


class RegistryError(ValueError):
    """A model that cannot be registered or found, or whose file changed since it was registered."""


@dataclass(frozen=True)
class ModelVersion:
    """One registered model version (`version` None: a model evaluated without registering it)."""

    name: str
    version: int | None
    digest: str  # SHA-256 of the weights file that is evaluated
    kind: Kind
    path: str  # the bundle folder or the checkpoint file
    backbone: str
    img_size: int
    registered_at: str = ""
    aliases: tuple[str, ...] = ()

    @property
    def label(self) -> str:
        return self.name if self.version is None else f"{self.name} v{self.version}"


def describe(path: str | Path, name: str, img_size: int = OFFICIAL_IMG_SIZE) -> ModelVersion:
    """What `path` holds, unregistered: its kind, the digest of its weights, backbone and input
    size (`img_size` is used by official release files only, whose weights fit any size)."""
    path = Path(path).expanduser().resolve()
    if not NAME.match(name):
        raise RegistryError(f"model name {name!r}: use letters, digits, '.', '_' and '-' "
                            "(starting with a letter or digit)")
    if path.is_dir():
        bundle = Bundle.open(path)
        bundle.path("checkpoint")  # raises when the file does not match config.json
        model = bundle.config["model"]
        return ModelVersion(name, None, bundle.config["files"]["checkpoint"]["sha256"], "bundle", str(path),
                            model["backbone"], model["img_size"])
    ckpt = read_checkpoint(path, "model", CheckpointError)
    if isinstance(ckpt, dict) and ckpt.get("format") == CHECKPOINT_FORMAT:
        config = ckpt["config"]
        return ModelVersion(name, None, sha256_of(path), "checkpoint", str(path), config["backbone"],
                            config["img_size"])
    read_official_state(path)  # raises, naming the file, unless it is an official EdgeSAM release
    return ModelVersion(name, None, sha256_of(path), "official", str(path), "repvit_m1", img_size)


def weights_file(model: ModelVersion) -> Path:
    """The file whose content `model.digest` is; for a bundle, checked against its config.json."""
    return Bundle.open(model.path).path("checkpoint") if model.kind == "bundle" else Path(model.path)


def load_model(model: ModelVersion) -> Sam:
    """The model in eval mode with its encoder fused, after checking that its weights are still
    the content that was registered."""
    weights = weights_file(model)
    if sha256_of(weights) != model.digest:
        raise RegistryError(f"{weights} ({model.label}) changed since it was registered (SHA-256 differs): "
                            f"register it again under a new version")
    if model.kind == "official":
        sam = load_official_edgesam(weights, model.img_size)
        sam.image_encoder.fuse()
        return sam
    return load_edgesam(weights, fuse=True)


class Registry:
    """Models and aliases in the ledger file at `path` (`edgesam.eval.ledger`)."""

    def __init__(self, path: str | Path):
        self.path = Path(path).expanduser().resolve()

    def register(self, path: str | Path, name: str, aliases: tuple[str, ...] = (),
                 img_size: int = OFFICIAL_IMG_SIZE) -> ModelVersion:
        """Add `path` as the next version of `name` (the latest version again when its content and
        path are unchanged) and move `aliases` to it."""
        model = describe(path, name, img_size)
        for alias in aliases:
            _check_alias(alias)
        with transaction(self.path) as db:
            for statement in SCHEMA:
                db.execute(statement)
            latest = db.execute("SELECT version, digest, path FROM models WHERE name = ? ORDER BY version DESC "
                                "LIMIT 1", (name,)).fetchone()
            if latest and (latest[1], latest[2]) == (model.digest, model.path):
                model = replace(model, version=latest[0])
            else:
                model = replace(model, version=(latest[0] if latest else 0) + 1, registered_at=utc_now())
                db.execute("INSERT INTO models VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                           (model.name, model.version, model.digest, model.kind, model.path, model.backbone,
                            model.img_size, model.registered_at))
            db.executemany("INSERT INTO alias_moves VALUES (?, ?, ?, ?)",
                           [(alias, name, model.version, utc_now()) for alias in aliases])
        return self.get(name, model.version)

    def move_alias(self, alias: str, name: str, version: int | None = None) -> ModelVersion:
        """Point `alias` at `name`'s `version` (its latest when None)."""
        _check_alias(alias)
        target = self.get(name, version)
        with transaction(self.path) as db:
            db.execute("INSERT INTO alias_moves VALUES (?, ?, ?, ?)", (alias, name, target.version, utc_now()))
        return self.get(name, target.version)

    def versions(self) -> list[ModelVersion]:
        """Every registered version (by name, then version) with the aliases that point at it now."""
        if not self.path.is_file():
            return []
        with reading(self.path) as db:
            if not db.execute("SELECT 1 FROM sqlite_master WHERE name = 'models'").fetchone():
                return []
            rows = db.execute("SELECT * FROM models ORDER BY name, version").fetchall()
            moves = db.execute("SELECT alias, name, version FROM alias_moves ORDER BY rowid").fetchall()
        current = {alias: (name, version) for alias, name, version in moves}  # the last move wins
        return [ModelVersion(**row, aliases=tuple(sorted(a for a, at in current.items()
                                                         if at == (row["name"], row["version"]))))
                for row in rows]

    def get(self, name: str, version: int | None = None) -> ModelVersion:
        found = [m for m in self.versions() if m.name == name and version in (None, m.version)]
        if not found:
            known = sorted({m.label for m in self.versions()}) or ["none yet"]
            raise RegistryError(f"{self.path}: no model {name!r}" + (f" version {version}" if version else "")
                                + f" (registered: {', '.join(known)})")
        return found[-1]

    def aliased(self) -> list[ModelVersion]:
        """The pinned set: every version an alias points at, champion first, then candidate."""
        rank = {CHAMPION: 0, CANDIDATE: 1}
        pinned = [m for m in self.versions() if m.aliases]
        return sorted(pinned, key=lambda m: (min(rank.get(a, 2) for a in m.aliases), m.name, m.version))

    def holder(self, alias: str) -> ModelVersion | None:
        return next((m for m in self.versions() if alias in m.aliases), None)


def _check_alias(alias: str) -> None:
    if not ALIAS.match(alias):
        raise RegistryError(f"alias {alias!r}: use lower-case letters, digits, '_' and '-', starting with a letter")
