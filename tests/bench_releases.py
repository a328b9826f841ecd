"""Writers of small benchmark releases in their published layouts, shared by the evaluation tests."""
from __future__ import annotations

import pytest


def write_editscore_release(path, rows) -> None:
    """An EditReward-Bench folder (HF ``save_to_disk``) with one row per
    ``(keys, instruction, source_png, output_pngs, task_type, dimension)``."""
    datasets = pytest.importorskip("datasets")
    feats = datasets.Features({
        "key": datasets.Sequence(datasets.Value("string"), length=2), "instruction": datasets.Value("string"),
        "input_image": datasets.Image(), "output_images": datasets.Sequence(datasets.Image(), length=2),
        "task_type": datasets.Value("string"), "dimension": datasets.Value("string")})
    im = lambda b: {"bytes": b, "path": None}  # noqa: E731
    datasets.Dataset.from_dict({
        "key": [r[0] for r in rows], "instruction": [r[1] for r in rows], "input_image": [im(r[2]) for r in rows],
        "output_images": [[im(b) for b in r[3]] for r in rows], "task_type": [r[4] for r in rows],
        "dimension": [r[5] for r in rows]}, features=feats).save_to_disk(str(path))
