"""TensorBoard event files read back by TensorBoard's own EventAccumulator."""

from __future__ import annotations

from pathlib import Path


def read_scalars(member_dir: Path) -> dict[str, dict[int, float]]:
    """{tag: {step: value}} of the scalars in a directory of event files; a step logged twice is an error."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(member_dir))
    acc.Reload()
    out: dict[str, dict[int, float]] = {}
    for tag in acc.Tags()["scalars"]:
        steps = [e.step for e in acc.Scalars(tag)]
        assert len(steps) == len(set(steps)), f"{tag}: a step logged twice in {member_dir}"
        out[tag] = {e.step: e.value for e in acc.Scalars(tag)}
    return out
