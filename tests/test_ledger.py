"""The results ledger (`edgesam.eval.ledger`): appends whole or not at all, two writers at once,
the queries the nightly flow makes, the gate's paired deltas, and the evaluation code version
that a comment-only edit leaves alone."""

from __future__ import annotations

import json
import shutil
import sqlite3
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest

from edgesam.eval.engine import protocol
from edgesam.eval.gate import compare
from edgesam.eval.history import history_rows, plot_trend, results_markdown
from edgesam.eval.ledger import EvaluationKey, Ledger, LedgerError, NightEntry
from edgesam.metrics import IoURecord
from edgesam.store.code import code_version, module_digests

REPO = Path(__file__).resolve().parents[1]
PROTOCOL = json.dumps({"dataset": "sa1b", "engine": asdict(protocol("paper", 1)), "max_images": None,
                       "max_annotations": 64, "seed": 0}, sort_keys=True)


def key(model: str = "m" * 64, code: str = "code1") -> EvaluationKey:
    return EvaluationKey(model, "b" * 64, PROTOCOL, code)


def records(ious: np.ndarray, prompt: str = "box") -> list[IoURecord]:
    """One record per (image, annotation) of the IoU matrix `ious` (images x annotations)."""
    return [IoURecord("m", "sa1b", prompt, "all", float(v), f"img{i}") for i, row in enumerate(ious) for v in row]


def metric(recs: list[IoURecord], prompt: str = "box") -> dict:
    value = float(np.mean([r.iou for r in recs]))
    return {"dataset": "sa1b", "prompt": prompt, "metric": "miou", "value": value, "low": value - 0.05,
            "high": value + 0.05, "images": len({r.image for r in recs}), "annotations": len(recs)}


def append(ledger: Ledger, ious: np.ndarray, k: EvaluationKey | None = None, name: str = "m", run: str = "run") -> int:
    recs = records(ious)
    return ledger.append(k or key(), name, "repvit_m1", "paper", [metric(recs)], recs, run)


def test_append_then_find_and_read_back(tmp_path: Path) -> None:
    ledger = Ledger(tmp_path / "ledger.sqlite")
    assert ledger.find(key()) is None  # no file yet: nothing known, nothing created
    assert not ledger.path.exists()
    ious = np.random.default_rng(0).uniform(size=(5, 3))
    first = append(ledger, ious)
    found = ledger.find(key())
    assert found is not None and found.id == first and found.key == key()
    assert (found.images, found.annotations, found.model_name) == (5, 15, "m")
    assert ledger.find(key(code="code2")) is None  # another evaluation code: not the same result
    assert ledger.metrics(first)[0]["value"] == pytest.approx(ious.mean())
    assert ledger.per_image(first, "sa1b", "box") == {f"img{i}": list(row) for i, row in enumerate(ious)}
    second = append(ledger, ious)
    assert second > first and ledger.find(key()).id == second  # appended, never replaced
    with sqlite3.connect(ledger.path) as db:  # queryable with ordinary tools: the flat view
        assert db.execute("SELECT COUNT(*), MIN(metric) FROM results").fetchone() == (2, "miou")


def test_a_failed_append_leaves_nothing(tmp_path: Path) -> None:
    ledger = Ledger(tmp_path / "ledger.sqlite")
    append(ledger, np.ones((2, 2)))
    recs = records(np.ones((2, 2)))
    broken = {k: v for k, v in metric(recs).items() if k != "low"}
    with pytest.raises(KeyError):
        ledger.append(key("x" * 64), "m", "repvit_m1", "paper", [broken], recs, "run")
    with sqlite3.connect(ledger.path) as db:
        assert db.execute("SELECT COUNT(*) FROM evaluations").fetchone() == (1,)
        assert db.execute("SELECT COUNT(*) FROM ious").fetchone() == (4,)


WRITER = """
import sys
import numpy as np
from edgesam.eval.ledger import EvaluationKey, Ledger
from edgesam.metrics import IoURecord
ledger, who = Ledger(sys.argv[1]), sys.argv[2]
for n in range(15):
    recs = [IoURecord("m", "sa1b", "box", "all", 0.5, f"img{i}") for i in range(200)]
    m = {"dataset": "sa1b", "prompt": "box", "metric": "miou", "value": 0.5, "low": 0.5, "high": 0.5,
         "images": 200, "annotations": 200}
    ledger.append(EvaluationKey(f"{who}{n}", "b", "p", "c"), who, "repvit_m1", "paper", [m], recs, who)
"""


def test_two_writers_lose_nothing(tmp_path: Path) -> None:
    path = tmp_path / "ledger.sqlite"
    writers = [subprocess.Popen([sys.executable, "-c", WRITER, str(path), who], cwd=REPO, stderr=subprocess.PIPE,
                                text=True) for who in ("a", "b")]
    for writer in writers:
        _, err = writer.communicate(timeout=120)
        assert writer.returncode == 0, err
    with sqlite3.connect(path) as db:
        assert db.execute("SELECT run_id, COUNT(*) FROM evaluations GROUP BY run_id").fetchall() == [("a", 15),
                                                                                                  ("b", 15)]
        assert db.execute("SELECT COUNT(*) FROM ious").fetchone() == (30 * 200,)
        torn = db.execute("SELECT COUNT(*) FROM evaluations e WHERE (SELECT COUNT(*) FROM ious i "
                          "WHERE i.evaluation_id = e.id) != 200").fetchone()
        assert torn == (0,)


CREATOR = """
import sys, time
import edgesam.eval.ledger as ledger_module
from edgesam.eval.ledger import EvaluationKey, Ledger
from edgesam.metrics import IoURecord
ledger_module.git_commit = lambda: ""  # no subprocess: both writers reach the new file together
folder, who, start = sys.argv[1], sys.argv[2], float(sys.argv[3])
for n in range(20):
    while time.time() < start + 0.15 * n:
        pass
    Ledger(f"{folder}/ledger{n}.sqlite").append(EvaluationKey(who, "b", "p", "c"), who, "repvit_m1", "paper", [],
                                              [IoURecord("m", "sa1b", "box", "all", 0.5, "img")], who)
"""


def test_two_writers_creating_a_ledger_together_both_append(tmp_path: Path) -> None:
    """The race that once failed CI: switching a new file to WAL does not wait for a busy
    timeout, so without the writer lock about half of these simultaneous creations failed."""
    start = time.time() + 3  # both interpreters started and imported by then
    writers = [subprocess.Popen([sys.executable, "-c", CREATOR, str(tmp_path), who, str(start)], cwd=REPO,
                                stderr=subprocess.PIPE, text=True) for who in ("a", "b")]
    for writer in writers:
        _, err = writer.communicate(timeout=120)
        assert writer.returncode == 0, err
    for n in range(20):
        with sqlite3.connect(tmp_path / f"ledger{n}.sqlite") as db:
            assert sorted(db.execute("SELECT run_id FROM evaluations").fetchall()) == [("a",), ("b",)]


def test_bad_files_are_named(tmp_path: Path) -> None:
    garbage = tmp_path / "garbage.sqlite"
    garbage.write_bytes(b"this is not a database" * 100)
    with pytest.raises(LedgerError, match="garbage.sqlite"):
        Ledger(garbage).find(key())
    other = tmp_path / "other.sqlite"
    sqlite3.connect(other).execute("CREATE TABLE t (x)").connection.close()
    with pytest.raises(LedgerError, match=r"other\.sqlite is not an edgesam ledger"):
        Ledger(other).nights()
    with pytest.raises(LedgerError, match="no ledger at .*missing.sqlite"):
        Ledger(tmp_path / "missing.sqlite").nights()
    ledger = Ledger(tmp_path / "ledger.sqlite")
    append(ledger, np.ones((1, 1)))
    with pytest.raises(LedgerError, match="no evaluation 99"):
        ledger.get(99)
    with pytest.raises(LedgerError, match="no night"):
        ledger.night()


def nights_with_a_drop(tmp_path: Path) -> tuple[Ledger, list[int]]:
    """Three nights of model `m`: the same weights twice, then new weights 0.2 worse on every object."""
    ledger = Ledger(tmp_path / "ledger.sqlite")
    ious = np.random.default_rng(1).uniform(0.5, 0.9, size=(12, 4))
    good = append(ledger, ious, run="night1")
    ledger.record_night("night1", "b" * 64, PROTOCOL, [NightEntry("m", 1, ("champion",), good, False)])
    ledger.record_night("night2", "b" * 64, PROTOCOL, [NightEntry("m", 1, ("champion",), good, True)])
    worse = append(ledger, ious - 0.2, key("w" * 64), run="night3")
    ledger.record_night("night3", "b" * 64, PROTOCOL, [NightEntry("m", 2, ("champion",), worse, False)])
    return ledger, [good, worse]


def test_nights_history_and_previous_entry(tmp_path: Path) -> None:
    ledger, (good, worse) = nights_with_a_drop(tmp_path)
    assert [n["run_id"] for n in ledger.nights()] == ["night3", "night2", "night1"]
    assert [(n["evaluated"], n["reused"]) for n in ledger.nights()] == [(1, 0), (0, 1), (1, 0)]
    assert ledger.previous("m", ledger.get(worse)).id == good
    rows = history_rows(ledger, ("box",))
    assert [(r["run"], r["model"], r["evaluated"]) for r in rows] == [
        ("night1", "m v1", "new"), ("night2", "m v1", "reused"), ("night3", "m v2", "new")]
    assert rows[0]["sa1b box"].startswith(f"{ledger.metrics(good)[0]['value']:.3f} [")
    night, models = ledger.night("night2")
    assert night["reused"] == 1 and [m["id"] for m in models] == [good]
    with pytest.raises(LedgerError, match="more than one"):
        ledger.night("night")


def test_gate_flags_a_drop_and_passes_the_same_model(tmp_path: Path) -> None:
    ledger, (good, worse) = nights_with_a_drop(tmp_path)
    (drop,) = compare(ledger, ledger.get(worse), ledger.get(good), "vs previous entry", "m v2", "m v1")
    assert drop.diff == pytest.approx(-0.2) and drop.high < -0.1 and drop.regressed
    assert drop.payload()["interval"] == [round(drop.low, 4), round(drop.high, 4)]
    (same,) = compare(ledger, ledger.get(good), ledger.get(good), "vs itself", "m v1", "m v1")
    assert same.diff == 0 and not same.regressed
    small = append(ledger, ledger_ious(ledger, good) - 0.003, key("s" * 64))  # a real drop within the tolerance
    (within,) = compare(ledger, ledger.get(small), ledger.get(good), "vs previous entry", "s", "m v1")
    assert within.high < 0 and not within.regressed
    other = append(ledger, np.ones((3, 4)), key("o" * 64))  # other images: not paired, not compared
    assert compare(ledger, ledger.get(other), ledger.get(good), "vs previous entry", "o", "m v1") == []


def ledger_ious(ledger: Ledger, evaluation_id: int) -> np.ndarray:
    return np.array(list(ledger.per_image(evaluation_id, "sa1b", "box").values()))


def test_results_tables_and_trend_plot(tmp_path: Path) -> None:
    ledger, _ = nights_with_a_drop(tmp_path)
    text = results_markdown(ledger)
    assert text.startswith("Nightly evaluation `night3` of ") and "commit `" in text and "| m v2 | champion |" in text
    plot_trend(ledger, tmp_path / "trend.png", ("box",))
    assert (tmp_path / "trend.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_comment_only_edit_keeps_the_evaluation_code_version(tmp_path: Path) -> None:
    """The nightly keys results on the evaluation modules' code: a comment or docstring edit
    keeps every ledger entry valid, a code edit in the engine does not."""
    copy = tmp_path / "repo"
    shutil.copytree(REPO / "edgesam", copy / "edgesam", ignore=shutil.ignore_patterns("__pycache__"))

    def version() -> str:
        return code_version(module_digests("edgesam.eval.benchmark", copy))

    before = version()
    engine = copy / "edgesam" / "eval" / "engine.py"
    engine.write_text("# a comment-only edit\n" + engine.read_text().replace('"""', '"""Edited docstring. ', 1))
    (copy / "edgesam" / "train.py").write_text("# an edit outside the evaluation code\nX = 1\n")
    assert version() == before
    engine.write_text(engine.read_text() + "\nCHANGED = 1\n")
    assert version() != before


def test_an_evaluate_stage_run_renders_the_readme_tables(tmp_path: Path) -> None:
    """Every model the evaluate stage measured, on every dataset, is one evaluation of its run;
    `edgesam models results --run` renders them with the values the ledger holds and the
    paired differences, stamped with the run and its commit."""
    from edgesam.cli import main
    from edgesam.eval.benchmark import Benchmark, append_stage_results
    from edgesam.eval.history import stage_results_markdown
    from edgesam.eval.stats import miou_interval, paired_difference, per_image

    rng = np.random.default_rng(0)
    quality = {"teacher": 0.8, "encoder_kd": 0.6, "prompt_kd": 0.7, "prompt_kd+rpn:official": 0.75}
    found = [IoURecord(model, dataset, prompt, "all", float(np.clip(q + rng.normal(0, 0.1), 0, 1)), f"{dataset}{i}")
             for model, q in quality.items() for dataset in ("sa1b", "coco") for prompt in ("box", "point", "point+1")
             for i in range(6) for _ in range(3) if dataset == "coco" or "rpn" not in model]
    bench = Benchmark(tmp_path, (), "d" * 64, protocol("paper", 1))
    models = {name: (name[0] * 64, "teacher (reference)" if name == "teacher" else "repvit_m1") for name in quality}
    ledger = Ledger(tmp_path / "ledger.sqlite")
    ids = append_stage_results(ledger, bench, {"paper": found}, models, 1, "v1", "evaluate/0123456789abcdef")
    assert len(ids) == 4 and ledger.get(ids[-1]).model_name == "prompt_kd+rpn:official"
    assert {m["dataset"] for m in ledger.metrics(ids[0])} == {"sa1b", "coco"}

    text = stage_results_markdown(ledger, "evaluate/0123")
    assert text.startswith("Evaluate stage `evaluate/0123456789abcdef` of ") and "commit `" in text
    assert "| model | SA-1B box | SA-1B point | COCO box | COCO point |" in text
    want = miou_interval(per_image(found, "prompt_kd", "coco", "point"))
    row = next(line for line in text.splitlines() if line.startswith("| phase 2 (prompt-in-the-loop KD) |"))
    assert row.split(" | ")[4] == f"{want['miou']:.3f} [{want['low']:.3f}, {want['high']:.3f}] |"
    assert "| phase 2 + RPN prior (`official`) |  |  |" in text  # the prior is measured on COCO only
    for model, baseline, dataset, prompt, what in (("prompt_kd", "teacher", "sa1b", "box", "phase 2 vs teacher"),
                                                   ("prompt_kd+rpn:official", "prompt_kd", "coco", "point",
                                                    "RPN official vs phase 2")):
        d = paired_difference(per_image(found, model, dataset, prompt), per_image(found, baseline, dataset, prompt))
        label = f"{what}, {'SA-1B' if dataset == 'sa1b' else 'COCO'} {prompt}"
        assert f"| {label} | {d['diff']:+.3f} [{d['diff_low']:+.3f}, {d['diff_high']:+.3f}] |" in text, label

    main(["models", "results", "--ledger", str(ledger.path), "--run", "evaluate/"])
    with pytest.raises(LedgerError, match="no run 'evaluate/ff'"):
        stage_results_markdown(ledger, "evaluate/ff")
