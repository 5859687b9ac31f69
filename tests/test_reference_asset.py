"""The shipped reference teacher (data/reference_teacher/): its card, metadata and file agree,
it verifies and loads as the teacher stage loads it, and its encoder outweighs the default
student's, as SAM's outweighs EdgeSAM's."""

from __future__ import annotations

from edgesam.artifacts import file_digests
from edgesam.config import load_profile
from edgesam.eval.speed import model_speed
from edgesam.models.edgesam import build_edgesam
from edgesam.models.reference import META, WEIGHTS, load_reference, reference_metadata, verify_reference
from pipelines.teacher import REFERENCE_TEACHER

REFERENCE_DIR = REFERENCE_TEACHER.parent


def test_card_metadata_and_file_agree():
    meta = reference_metadata(REFERENCE_DIR)
    digest, _ = file_digests(REFERENCE_DIR / WEIGHTS)
    assert digest == meta["sha256"] and (REFERENCE_DIR / WEIGHTS).stat().st_size == meta["bytes"] <= 31e6
    card = (REFERENCE_DIR / "CARD.md").read_text()
    assert digest in card and meta["benchmark"]["data_checksum"] in card
    assert f"{meta['val']['box_miou']:.3f}" in card and META in card


def test_it_verifies_loads_and_outweighs_the_default_student():
    digest, meta = verify_reference(REFERENCE_DIR / WEIGHTS)
    teacher = load_reference(REFERENCE_DIR / WEIGHTS)
    size = meta["arch"]["img_size"]
    default = load_profile("default")
    assert default.teacher.kind == "reference" and default.shard.target_size == size
    student = build_edgesam(backbone=default.encoder_kd.backbone, img_size=size)
    gmacs = {name: model_speed(sam, repeats=1)["encoder_gmacs"]
             for name, sam in (("teacher", teacher), ("student", student))}
    assert gmacs["teacher"] > 1.5 * gmacs["student"], gmacs
