"""Flow parameters -> `PipelineConfig`: the named parameters are shortcuts into the profile."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from edgesam.config import STAGES, PipelineConfig, available_profiles, deep_merge, load_profile, validate_before_work

Profile = Literal[tuple(available_profiles())]  # type: ignore[valid-type]
StageName = Literal[STAGES]  # type: ignore[valid-type]
TeacherKind = Literal["synthetic", "reference", "vit_h", "vit_l", "vit_b"]

# Flow parameter -> (config section, field).
SHORTCUTS: dict[str, tuple[str, str]] = {
    "sa1b_path": ("data", "sa1b_path"),
    "coco_sources": ("data", "coco_sources"),
    "coco_train": ("data", "coco_train"),
    "coco_val": ("data", "coco_val"),
    "coco_images": ("data", "coco_images"),
    "teacher_kind": ("teacher", "kind"),
    "teacher_checkpoint": ("teacher", "checkpoint"),
    "backbone": ("encoder_kd", "backbone"),
    "ray_address": ("runtime", "ray_address"),
    "num_workers": ("runtime", "num_workers"),
    "use_gpu": ("runtime", "use_gpu"),
    "work_dir": ("runtime", "work_dir"),
}


def pipeline_config(profile: str, overrides: dict[str, Any] | None = None, **shortcuts: Any) -> PipelineConfig:
    """The profile, with `overrides` deep-merged on top and then the non-None shortcuts.

    `work_dir` is made absolute so artifact paths in logs, results and the cache key do not
    depend on the directory a flow run happens to start in.
    """
    unknown = set(shortcuts) - set(SHORTCUTS)
    if unknown:
        raise TypeError(f"unknown flow parameters: {', '.join(sorted(unknown))}")
    named: dict[str, dict[str, Any]] = {}
    for key, value in shortcuts.items():
        if value is not None:
            section, field = SHORTCUTS[key]
            named.setdefault(section, {})[field] = str(value) if isinstance(value, Path) else value
    cfg = load_profile(profile, deep_merge(overrides or {}, named))
    cfg.runtime.work_dir = cfg.runtime.work_dir.expanduser().resolve()
    validate_before_work(cfg)  # before any stage: a missing input or checkpoint names its key
    return cfg
