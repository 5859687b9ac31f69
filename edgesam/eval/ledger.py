"""The results ledger: every evaluation of a model on a benchmark, append-only, in one SQLite file.

Why SQLite rather than Parquet: one file in the work dir that `sqlite3`, pandas or any SQL client
reads; a transaction makes an evaluation (its row, its metrics and every annotation's IoU)
appear whole or not at all; two writers (a nightly run and `edgesam models register`, two runs
started at once) are serialised by an OS lock on a file beside the ledger, then by SQLite's own
(WAL journal, a busy timeout), so no append is lost or torn. The OS lock is needed because
switching a new file to WAL cannot wait: two writers creating the ledger together made one fail
at once with "database is locked", whatever the busy timeout. Parquet would need one file per
append and readers that merge them. Keep the file on a local disk: SQLite's locks are not
reliable over NFS.

Rows are only ever inserted. An evaluation is keyed on (model digest, benchmark digest,
protocol, evaluation code version): a key already in the ledger is a result that need not be
computed again. A night (`nights`, `night_models`) records which evaluation stood for which
registered model that night, evaluated anew or reused, so the history has every night.
The view `results` is the flat table: one row per evaluation and metric.
"""

from __future__ import annotations

import os
import sqlite3
import subprocess
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

from edgesam.metrics import IoURecord
from edgesam.store.lock import artifact_lock

LEDGER_FILE = "ledger.sqlite"  # in a profile's work dir: runs/<profile>/ledger.sqlite
DEFAULT_WORK_DIR = Path("runs") / "default"  # the default profile's work dir
BUSY_TIMEOUT_S = 120.0  # a second writer waits this long for the first one's transaction
REPO_ROOT = Path(__file__).resolve().parents[2]

SCHEMA = """
CREATE TABLE IF NOT EXISTS evaluations (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    model_digest TEXT NOT NULL, model_name TEXT NOT NULL, backbone TEXT NOT NULL,
    benchmark_digest TEXT NOT NULL, protocol_name TEXT NOT NULL, protocol TEXT NOT NULL,
    eval_code TEXT NOT NULL, images INTEGER NOT NULL, annotations INTEGER NOT NULL,
    created_at TEXT NOT NULL, git_commit TEXT NOT NULL, run_id TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS evaluation_key ON evaluations (model_digest, benchmark_digest, protocol, eval_code);
CREATE TABLE IF NOT EXISTS metrics (
    evaluation_id INTEGER NOT NULL REFERENCES evaluations (id), dataset TEXT NOT NULL, prompt TEXT NOT NULL,
    metric TEXT NOT NULL, value REAL NOT NULL, low REAL NOT NULL, high REAL NOT NULL,
    images INTEGER NOT NULL, annotations INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS ious (
    evaluation_id INTEGER NOT NULL REFERENCES evaluations (id), dataset TEXT NOT NULL, prompt TEXT NOT NULL,
    image TEXT NOT NULL, size TEXT NOT NULL, iou REAL NOT NULL);
CREATE INDEX IF NOT EXISTS ious_of ON ious (evaluation_id, dataset, prompt);
CREATE TABLE IF NOT EXISTS nights (
    run_id TEXT PRIMARY KEY, started_at TEXT NOT NULL, git_commit TEXT NOT NULL,
    benchmark_digest TEXT NOT NULL, protocol TEXT NOT NULL, evaluated INTEGER NOT NULL, reused INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS night_models (
    run_id TEXT NOT NULL REFERENCES nights (run_id), model_name TEXT NOT NULL, version INTEGER,
    aliases TEXT NOT NULL, evaluation_id INTEGER NOT NULL REFERENCES evaluations (id), reused INTEGER NOT NULL);
CREATE VIEW IF NOT EXISTS results AS
    SELECT e.id AS evaluation_id, e.model_digest, e.model_name, e.backbone, e.benchmark_digest, e.protocol_name,
           e.eval_code, m.dataset, m.prompt, m.metric, m.value, m.low, m.high, m.images, m.annotations,
           e.created_at, e.git_commit, e.run_id
    FROM evaluations e JOIN metrics m ON m.evaluation_id = e.id;
"""


class LedgerError(ValueError):
    """A ledger file that is missing, not a ledger, or lacks the entry asked for."""


@dataclass(frozen=True)
class EvaluationKey:
    """What makes two evaluations the same result: the model's and the benchmark's content, how
    objects are prompted (canonical JSON) and the version of the code that evaluates."""

    model_digest: str
    benchmark_digest: str
    protocol: str
    eval_code: str


@dataclass(frozen=True)
class Evaluation:
    """One evaluation row of the ledger."""

    id: int
    model_digest: str
    model_name: str
    backbone: str
    benchmark_digest: str
    protocol_name: str
    protocol: str
    eval_code: str
    images: int
    annotations: int
    created_at: str
    git_commit: str
    run_id: str

    @property
    def key(self) -> EvaluationKey:
        return EvaluationKey(self.model_digest, self.benchmark_digest, self.protocol, self.eval_code)


@dataclass(frozen=True)
class NightEntry:
    """Which evaluation stood for a registered model (or the latest export) on one night."""

    model_name: str
    version: int | None
    aliases: tuple[str, ...]
    evaluation_id: int
    reused: bool


def default_path(work_dir: str | Path = DEFAULT_WORK_DIR) -> Path:
    """Where the ledger (and the registry in it) lives unless a path is given: `EDGESAM_LEDGER`,
    else `ledger.sqlite` in the work dir (relative paths: from the checkout a deployment runs in)."""
    return Path(os.environ.get("EDGESAM_LEDGER") or Path(work_dir) / LEDGER_FILE).expanduser().resolve()


def utc_now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def git_commit(root: Path = REPO_ROOT) -> str:
    """HEAD of the checkout that holds this code, `+dirty` with uncommitted changes to tracked
    files; "" outside a git checkout."""
    try:
        head = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True,
                              check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return ""
    return head + ("+dirty" if dirty else "")


@contextmanager
def transaction(path: Path) -> Iterator[sqlite3.Connection]:
    """A write transaction on the ledger at `path` (created with its schema when new), with the
    ledger's writer lock held: a concurrent writer waits for it instead of failing halfway."""
    with artifact_lock(path, "ledger"):
        db = sqlite3.connect(path, timeout=BUSY_TIMEOUT_S, isolation_level=None)
        try:
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("BEGIN IMMEDIATE")
            _create(db)
            yield db
            db.execute("COMMIT")
        except BaseException:
            if db.in_transaction:
                db.execute("ROLLBACK")
            raise
        finally:
            db.close()


def _create(db: sqlite3.Connection) -> None:
    """The schema, statement by statement (`executescript` would commit the open transaction)."""
    for statement in filter(str.strip, SCHEMA.split(";")):
        db.execute(statement)


@contextmanager
def reading(path: Path) -> Iterator[sqlite3.Connection]:
    """A read connection on an existing ledger (rows as `sqlite3.Row`)."""
    if not path.is_file():
        raise LedgerError(f"no ledger at {path}: an evaluate stage, a nightly run or `edgesam models register` "
                          "creates it")
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=BUSY_TIMEOUT_S)
    db.row_factory = sqlite3.Row
    try:
        if not db.execute("SELECT 1 FROM sqlite_master WHERE name = 'evaluations'").fetchone():
            raise LedgerError(f"{path} is not an edgesam ledger (no 'evaluations' table)")
        yield db
    except sqlite3.DatabaseError as exc:
        raise LedgerError(f"{path} cannot be read as an edgesam ledger: {exc}") from exc
    finally:
        db.close()


class Ledger:
    """The ledger file at `path`; every method opens its own connection (safe from any thread)."""

    def __init__(self, path: str | Path):
        self.path = Path(path).expanduser().resolve()

    def append(self, key: EvaluationKey, model_name: str, backbone: str, protocol_name: str,
               metrics: Sequence[dict[str, Any]], records: Iterable[IoURecord], run_id: str) -> int:
        """Add one evaluation with its metrics ({dataset, prompt, metric, value, low, high, images,
        annotations}) and every annotation's IoU, in one transaction; returns its id."""
        records = list(records)
        images = len({r.image for r in records})
        annotations = max((m["annotations"] for m in metrics), default=0)
        commit = git_commit()  # before the write lock: a subprocess
        with transaction(self.path) as db:
            cursor = db.execute(
                "INSERT INTO evaluations (model_digest, model_name, backbone, benchmark_digest, protocol_name, "
                "protocol, eval_code, images, annotations, created_at, git_commit, run_id) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (key.model_digest, model_name, backbone, key.benchmark_digest, protocol_name, key.protocol,
                 key.eval_code, images, annotations, utc_now(), commit, run_id))
            evaluation_id = int(cursor.lastrowid)
            db.executemany("INSERT INTO metrics VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                           [(evaluation_id, m["dataset"], m["prompt"], m["metric"], m["value"], m["low"], m["high"],
                             m["images"], m["annotations"]) for m in metrics])
            db.executemany("INSERT INTO ious VALUES (?, ?, ?, ?, ?, ?)",
                           [(evaluation_id, r.dataset, r.prompt, r.image, r.size, r.iou) for r in records])
        return evaluation_id

    def find(self, key: EvaluationKey) -> Evaluation | None:
        """The latest evaluation with `key`, or None (also when there is no ledger yet)."""
        if not self.path.is_file():
            return None
        with reading(self.path) as db:
            row = db.execute("SELECT * FROM evaluations WHERE model_digest = ? AND benchmark_digest = ? "
                             "AND protocol = ? AND eval_code = ? ORDER BY id DESC LIMIT 1",
                             (key.model_digest, key.benchmark_digest, key.protocol, key.eval_code)).fetchone()
        return Evaluation(**row) if row else None

    def get(self, evaluation_id: int) -> Evaluation:
        with reading(self.path) as db:
            row = db.execute("SELECT * FROM evaluations WHERE id = ?", (evaluation_id,)).fetchone()
        if row is None:
            raise LedgerError(f"{self.path} has no evaluation {evaluation_id}")
        return Evaluation(**row)

    def metrics(self, evaluation_id: int) -> list[dict[str, Any]]:
        """The evaluation's metrics in the order they were measured."""
        with reading(self.path) as db:
            rows = db.execute("SELECT dataset, prompt, metric, value, low, high, images, annotations FROM metrics "
                              "WHERE evaluation_id = ? ORDER BY rowid", (evaluation_id,)).fetchall()
        return [dict(row) for row in rows]

    def per_image(self, evaluation_id: int, dataset: str, prompt: str) -> dict[str, list[float]]:
        """IoUs by image of one evaluation, dataset and prompt type (what paired intervals need)."""
        with reading(self.path) as db:
            rows = db.execute("SELECT image, iou FROM ious WHERE evaluation_id = ? AND dataset = ? AND prompt = ? "
                              "ORDER BY rowid", (evaluation_id, dataset, prompt)).fetchall()
        out: dict[str, list[float]] = {}
        for image, iou in rows:
            out.setdefault(image, []).append(iou)
        return out

    def previous(self, model_name: str, current: Evaluation) -> Evaluation | None:
        """The latest other evaluation that stood for `model_name` on an earlier night, on the same
        benchmark and protocol: what `current` is compared with."""
        if not self.path.is_file():
            return None
        with reading(self.path) as db:
            row = db.execute(
                "SELECT e.* FROM night_models n JOIN nights ON nights.run_id = n.run_id "
                "JOIN evaluations e ON e.id = n.evaluation_id WHERE n.model_name = ? AND e.id != ? "
                "AND e.benchmark_digest = ? AND e.protocol = ? ORDER BY nights.started_at DESC, e.id DESC LIMIT 1",
                (model_name, current.id, current.benchmark_digest, current.protocol)).fetchone()
        return Evaluation(**row) if row else None

    def record_night(self, run_id: str, benchmark_digest: str, protocol: str, entries: Sequence[NightEntry]) -> None:
        """The night `run_id`: which evaluation stood for each pinned model, and how many were new."""
        reused, commit = sum(e.reused for e in entries), git_commit()
        with transaction(self.path) as db:
            db.execute("INSERT INTO nights VALUES (?, ?, ?, ?, ?, ?, ?)",
                       (run_id, utc_now(), commit, benchmark_digest, protocol, len(entries) - reused, reused))
            db.executemany("INSERT INTO night_models VALUES (?, ?, ?, ?, ?, ?)",
                           [(run_id, e.model_name, e.version, ",".join(e.aliases), e.evaluation_id, int(e.reused))
                            for e in entries])

    def nights(self, limit: int | None = None) -> list[dict[str, Any]]:
        """Nights, newest first."""
        with reading(self.path) as db:
            rows = db.execute("SELECT * FROM nights ORDER BY started_at DESC, rowid DESC"
                              + (" LIMIT ?" if limit else ""), (limit,) if limit else ()).fetchall()
        return [dict(row) for row in rows]

    def night(self, run_id: str | None = None) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        """A night (the latest when `run_id` is None; a unique prefix of its id works) and its
        models: their evaluations' rows with the name, version and aliases they had that night
        (`registered_name`, `version`, `aliases`, `reused`)."""
        with reading(self.path) as db:
            found = db.execute("SELECT * FROM nights WHERE run_id LIKE ? ORDER BY started_at DESC, rowid DESC",
                               ((run_id or "") + "%",)).fetchall()
            if not found or (run_id and len(found) > 1):
                what = f"night {run_id!r}" if run_id else "night"
                raise LedgerError(f"{self.path}: {'no' if not found else 'more than one'} {what} "
                                  f"({len(found)} match; run ids: `SELECT run_id FROM nights`)")
            models = db.execute("SELECT e.*, n.model_name AS registered_name, n.version, n.aliases, n.reused "
                                "FROM night_models n "
                                "JOIN evaluations e ON e.id = n.evaluation_id WHERE n.run_id = ? ORDER BY n.rowid",
                                (found[0]["run_id"],)).fetchall()
        return dict(found[0]), [dict(row) for row in models]

    def run(self, run_id: str) -> list[Evaluation]:
        """The evaluations one run appended (an evaluate stage's `evaluate/<fingerprint>`; a unique
        prefix of the id works), in the order they were made."""
        with reading(self.path) as db:
            ids = [r[0] for r in db.execute("SELECT DISTINCT run_id FROM evaluations WHERE run_id LIKE ? "
                                            "ORDER BY run_id", (run_id + "%",)).fetchall()]
            if len(ids) != 1:
                raise LedgerError(f"{self.path}: {'no' if not ids else 'more than one'} run {run_id!r} "
                                  f"({', '.join(ids[:8]) or 'run ids: `SELECT DISTINCT run_id FROM evaluations`'})")
            rows = db.execute("SELECT * FROM evaluations WHERE run_id = ? ORDER BY id", (ids[0],)).fetchall()
        return [Evaluation(**row) for row in rows]

    def history(self, prompts: Sequence[str], limit: int = 60) -> list[dict[str, Any]]:
        """Per night (oldest first, the last `limit`) and model: its evaluation and the metrics of `prompts`."""
        with reading(self.path) as db:
            rows = db.execute(
                "SELECT nights.run_id, nights.started_at, n.model_name, n.version, n.aliases, n.reused, "
                "e.id AS evaluation_id, e.model_digest, m.dataset, m.prompt, m.value, m.low, m.high FROM "
                "(SELECT *, rowid AS seq FROM nights ORDER BY started_at DESC, rowid DESC LIMIT ?) nights "
                "JOIN night_models n ON n.run_id = nights.run_id JOIN evaluations e ON e.id = n.evaluation_id "
                f"JOIN metrics m ON m.evaluation_id = e.id WHERE m.prompt IN ({','.join('?' * len(prompts))}) "
                "ORDER BY nights.started_at, nights.seq, n.rowid, m.rowid", (limit, *prompts)).fetchall()
        return [dict(row) for row in rows]
