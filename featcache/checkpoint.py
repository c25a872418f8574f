"""Checkpoints: safetensors weights + a JSON config, never pickle.

A member directory ``RUNDIR/members/<name>/`` holds ``best.safetensors`` (the weights at the member's
best evaluation), ``last.safetensors`` and ``config.json``:
  featcache_checkpoint  int, CHECKPOINT_FORMAT
  featcache_version, name, method, method_config, train (TrainConfig), method_input (taps, classes)
  store                 {"url", "split", "manifest"}: the store manifest it was trained on
  best                  {"epoch", "<split>_acc", ...} at the best evaluation
``RUNDIR/best.json`` names the best member of the sweep.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from featcache import __version__, methods
from featcache.errors import CheckpointError, FormatVersionError
from featcache.methods.base import MethodInput, SideNetwork

CHECKPOINT_FORMAT = 1
SUPPORTED_CHECKPOINT_FORMATS = (1,)


def safe_member_name(name: str) -> str:
    """A member name as one path component inside RUNDIR/members (never a path: no separators, no '..')."""
    if (
        not isinstance(name, str)
        or not name
        or name in (".", "..")
        or any(c in name for c in "/\\\0")
        or name.startswith(".")
    ):
        raise CheckpointError(
            f"member name {name!r} cannot name a directory inside the run; the run files are "
            "damaged or were not written by featcache"
        )
    return name


def write_json(path: Path, data: Any) -> None:
    """Atomic JSON write (temp file + rename): a crash never leaves half a file."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=2, default=str) + "\n")
    os.replace(tmp, path)


def write_tensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    """Atomic safetensors write."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata=metadata)
    os.replace(tmp, path)


def read_tensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as err:
        raise CheckpointError(
            f"cannot read weights {path} ({err}); the checkpoint is damaged: retrain or use another member"
        ) from None


@dataclass
class Checkpoint:
    """A loaded member: its side network (eval mode) and its config record."""

    network: SideNetwork
    config: dict[str, Any]
    path: Path

    @property
    def manifest(self) -> dict[str, Any]:
        return self.config["store"]["manifest"]

    @property
    def classes(self) -> list[str]:
        return list(self.config["method_input"].get("classes", []))


def member_config(
    name: str,
    method: str,
    method_config: dict[str, Any],
    train: dict[str, Any],
    method_input: MethodInput,
    store: dict[str, Any],
    classes: list[str],
) -> dict[str, Any]:
    mi = method_input.to_dict()
    mi["classes"] = classes
    return {
        "featcache_checkpoint": CHECKPOINT_FORMAT,
        "featcache_version": __version__,
        "name": name,
        "method": method,
        "method_config": method_config,
        "train": train,
        "method_input": mi,
        "store": store,
        "best": None,
    }


def resolve_checkpoint(path: str | Path) -> tuple[Path, Path]:
    """RUNDIR (-> its best member), a member directory or a member's .safetensors -> (config.json, weights)."""
    p = Path(path)
    if not p.exists():
        raise CheckpointError(
            f"checkpoint {path} does not exist; pass a run directory made by featcache train, a "
            "member directory (RUNDIR/members/NAME) or its .safetensors file"
        )
    if p.is_file():
        if p.suffix != ".safetensors":
            raise CheckpointError(
                f"{path} is not a featcache checkpoint: pass a .safetensors file written by "
                "featcache train, or its run directory"
            )
        return p.parent / "config.json", p
    if (p / "best.json").is_file():
        try:
            best = json.loads((p / "best.json").read_text())
            p = p / "members" / safe_member_name(best["name"])  # a name inside the run, never a path
        except (ValueError, KeyError, TypeError, CheckpointError) as err:
            raise CheckpointError(f"{path}/best.json is damaged ({err}); pass a member directory instead") from None
    elif (p / "members").is_dir() and not (p / "config.json").exists():
        raise CheckpointError(
            f"run {path} has no best member yet (no best.json): the run did not evaluate; pass RUNDIR/members/NAME"
        )
    weights = p / "best.safetensors" if (p / "best.safetensors").exists() else p / "last.safetensors"
    return p / "config.json", weights


def load_checkpoint(path: str | Path) -> Checkpoint:
    """Rebuild a trained side network from its checkpoint (safetensors + JSON; nothing is unpickled)."""
    config_path, weights = resolve_checkpoint(path)
    if not config_path.is_file() or not weights.is_file():
        raise CheckpointError(
            f"{path} is not a complete featcache checkpoint (needs {config_path.name} and {weights.name})"
        )
    try:
        config = json.loads(config_path.read_text())
    except ValueError as err:
        raise CheckpointError(f"{config_path} is not valid JSON ({err}); the checkpoint is damaged") from None
    version = config.get("featcache_checkpoint")
    if not isinstance(version, int):
        raise CheckpointError(f"{config_path} is not a featcache checkpoint config (no featcache_checkpoint)")
    if version > CHECKPOINT_FORMAT:
        raise FormatVersionError(
            f"checkpoint {config_path.parent} uses checkpoint format {version}, newer than this "
            f"featcache ({__version__}, format {CHECKPOINT_FORMAT}): upgrade featcache"
        )
    if version not in SUPPORTED_CHECKPOINT_FORMATS:
        raise FormatVersionError(
            f"checkpoint {config_path.parent} uses checkpoint format {version}, which this "
            f"featcache ({__version__}) does not read (supported: {SUPPORTED_CHECKPOINT_FORMATS}); "
            "retrain it with this featcache"
        )
    try:
        mi = MethodInput.from_dict({k: v for k, v in config["method_input"].items() if k != "classes"})
        method, method_config = config["method"], config["method_config"]
        config["store"]["manifest"]["featcache_format"]  # noqa: B018 - predict rebuilds the backbone from it
    except (KeyError, TypeError, AttributeError) as err:
        raise CheckpointError(
            f"{config_path} is incomplete ({type(err).__name__}: {err}); the checkpoint is damaged: "
            "retrain or use another member"
        ) from None
    network = methods.create(method, method_config, mi)
    state = read_tensors(weights)
    try:
        network.load_state_dict(state, strict=True)
    except RuntimeError as err:
        raise CheckpointError(
            f"weights {weights} do not fit method {config['method']!r} with the config in "
            f"{config_path.name} ({str(err).splitlines()[0]}); the checkpoint's weights and config "
            "disagree: use the config.json written with these weights, or retrain"
        ) from None
    return Checkpoint(network.eval(), config, weights)
