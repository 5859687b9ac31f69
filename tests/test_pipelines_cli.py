"""`python -m pipelines --help` and `python -m pipelines <stage> --help`: stages and profiles, one line each."""

from __future__ import annotations

import pytest

from edgesam.config import STAGES, available_profiles, profile_summary
from pipelines.cli import main
from pipelines.stage import stage_module


def help_text(capsys, *argv: str) -> str:
    with pytest.raises(SystemExit) as exit_:
        main(list(argv))
    assert exit_.value.code == 0
    return capsys.readouterr().out


def test_help_lists_every_stage_and_profile_with_one_line(capsys):
    text = help_text(capsys, "--help")
    lines = text.splitlines()
    for stage in STAGES:
        summary = stage_module(stage).__doc__.splitlines()[0].split(": ", 1)[1]
        assert f"  {stage:<11} {summary}" in lines
    assert set(available_profiles()) >= {"smoke", "default", "paper"}
    for profile in available_profiles():
        assert profile_summary(profile) and f"  {profile:<11} {profile_summary(profile)}" in lines
    assert "  smoke       Tiny end-to-end run: the whole DAG in about 5 minutes on 2 CPU cores (used by the e2e test)." in lines


@pytest.mark.parametrize("stage", ["prompt_kd", "shard"])
def test_stage_help_describes_the_stage_and_lists_the_profiles(capsys, stage):
    text = help_text(capsys, stage, "--help")
    assert text.startswith(f"usage: python -m pipelines {stage} ")
    assert stage_module(stage).__doc__.strip().splitlines()[0] in text and "--profile {" in text
    assert all(f"  {p:<11} {profile_summary(p)}" in text.splitlines() for p in available_profiles())
    assert "stages, in DAG order:" not in text
