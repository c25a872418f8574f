"""Sweeps: ``--set`` / ``--grid`` / sweep files -> K members, and members grouped into banks.

A key goes to the training config when it is a ``TrainConfig`` field and to the method's config
otherwise; ``method`` itself may be a grid key (e.g. ``--grid method=last,linear``). Members that
share a method and an architecture (same method config) are trained as one stacked bank.
"""

from __future__ import annotations

import itertools
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from featcache import methods
from featcache.config import did_you_mean
from featcache.errors import ConfigError
from featcache.options import TRAIN_KEYS, TrainConfig

SWEEP_GLOBAL = ("epochs", "batch_size", "eval_every")  # all members see the same batches and evaluations


@dataclass
class SweepMember:
    """One member of a sweep: a name, a method with its config, and its training config."""

    name: str
    method: str
    method_config: dict[str, Any]
    train: TrainConfig
    overrides: dict[str, Any] = field(default_factory=dict)  # what the grid set for this member

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "method": self.method,
            "method_config": self.method_config,
            "train": self.train.to_dict(),
            "overrides": self.overrides,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "SweepMember":
        return cls(
            d["name"], d["method"], d["method_config"], TrainConfig.from_dict(d["train"]), d.get("overrides", {})
        )

    def arch_key(self) -> str:
        """Members with equal keys have identically shaped parameters and the same inputs (the same feature
        augmentation), so they share a bank."""
        return json.dumps(
            [self.method, self.method_config, self.train.augment().to_dict()], sort_keys=True, default=str
        )


def group_banks(members: list[SweepMember]) -> list[list[SweepMember]]:
    """The members that train together in one bank (equal ``arch_key``), in member order; banks in the order
    of their first member."""
    banks: dict[str, list[SweepMember]] = {}
    for m in members:
        banks.setdefault(m.arch_key(), []).append(m)
    return list(banks.values())


def _method_keys(method: str) -> list[str]:
    return methods.config_class(method).keys()


def _route(method: str, values: dict[str, Any], others: tuple[str, ...] = ()) -> tuple[dict[str, Any], dict[str, Any]]:
    """Split keys into (train keys, method keys); unknown keys are an error listing the valid ones.

    In a multi-method sweep (``others``), a key of another method in the sweep is skipped here.
    """
    method_keys = _method_keys(method)
    train, meth = {}, {}
    for key, value in values.items():
        if key in TRAIN_KEYS:
            train[key] = value
        elif key in method_keys:
            meth[key] = value
        elif any(key in _method_keys(o) for o in others):
            continue
        else:
            raise ConfigError(
                f"unknown setting {key!r} for method {method!r}"
                f"{did_you_mean(key, list(TRAIN_KEYS) + method_keys)} Training keys: "
                f"{', '.join(TRAIN_KEYS)}; {method} keys: {', '.join(method_keys)}"
            )
    return train, meth


def _for_method(method: str, values: dict[str, Any], methods_used: list[str]) -> dict[str, Any]:
    """``values`` as ``method`` sees them: ``METHOD.KEY`` sets KEY for that method only (over a plain KEY)."""
    out = {k: v for k, v in values.items() if "." not in k}
    for key, value in values.items():
        if "." not in key:
            continue
        prefix, plain = key.split(".", 1)
        if prefix not in methods_used:
            raise ConfigError(
                f"setting {key!r}: {prefix!r} is not a method of this sweep ({', '.join(methods_used)}); "
                f"METHOD.KEY=VALUE sets KEY for one method of a multi-method sweep, e.g. linear.lr=0.01"
            )
        if prefix == method:
            out[plain] = value
    return out


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, (list, tuple)):
        return "+".join(_fmt(v) for v in value)
    return str(value)


def expand(
    method: str, settings: dict[str, Any] | None = None, grid: dict[str, list[Any]] | None = None
) -> list[SweepMember]:
    """The members of ``settings`` x the Cartesian product of ``grid`` (K = product of the value counts)."""
    settings, grid = dict(settings or {}), dict(grid or {})
    for key in SWEEP_GLOBAL:
        if key in grid and len(grid[key]) > 1:
            raise ConfigError(
                f"{key} cannot vary inside one sweep (all members share batches and evaluations); "
                f"use --set {key}=N or run separate sweeps"
            )
    for key, values in grid.items():
        if not values:
            raise ConfigError(f"--grid {key} has no values")
        if len(set(map(json.dumps, values))) != len(values):
            raise ConfigError(f"--grid {key} repeats a value: {values}")
    for key in grid:
        if key in settings:
            raise ConfigError(f"{key!r} is given both by --set and by --grid; give it once")
    methods_used = [str(m) for m in grid.get("method", [settings.pop("method", method)])]
    grid.pop("method", None)
    for m in methods_used:
        methods.config_class(m)  # unknown method -> clear error
    _for_method(methods_used[0], grid, methods_used)  # every METHOD. prefix of the grid names a method of the sweep
    members: list[SweepMember] = []
    for m in methods_used:
        others = tuple(o for o in methods_used if o != m)
        # in a multi-method sweep, another method's grid keys do not multiply this method's members
        keys = [
            k
            for k in grid
            if not (
                others
                and k not in TRAIN_KEYS
                and k not in _method_keys(m)
                and any(k in _method_keys(o) for o in others)
            )
            and ("." not in k or k.startswith(m + "."))
        ]  # another method's METHOD.KEY: not this one's
        for combo in itertools.product(*(grid[k] for k in keys)):
            over = dict(zip(keys, combo))
            train_kw, meth_kw = _route(m, _for_method(m, {**settings, **over}, methods_used), others)
            train_cfg = TrainConfig(**train_kw)
            meth_cfg = methods.config_class(m).from_dict(meth_kw).to_dict()
            shown = ([("method", m)] if len(methods_used) > 1 else []) + list(over.items())
            name = "-".join(f"{k}={_fmt(v)}" for k, v in shown) or m
            name = name.replace("/", "_").replace("\\", "_").replace("\0", "_")  # one directory: RUNDIR/members/NAME
            members.append(
                SweepMember(name, m, meth_cfg, train_cfg, ({"method": m} if len(methods_used) > 1 else {}) | over)
            )
    names = [mem.name for mem in members]
    if len(set(names)) != len(names):
        raise ConfigError(f"sweep member names collide: {names}")
    base = members[0].train
    for key in SWEEP_GLOBAL:
        if any(getattr(mem.train, key) != getattr(base, key) for mem in members):
            raise ConfigError(f"{key} must be the same for all members of a sweep")
    return members


def load_sweep_file(path: str | Path) -> tuple[dict[str, Any], dict[str, list[Any]]]:
    """A JSON or YAML sweep file: ``{"set": {KEY: VALUE}, "grid": {KEY: [V1, V2]}}`` -> (settings, grid)."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"sweep file {path} not found")
    text = p.read_text()
    try:
        if p.suffix in (".yaml", ".yml"):
            import yaml

            data = yaml.safe_load(text)
        else:
            data = json.loads(text)
    except Exception as err:
        raise ConfigError(
            f"sweep file {path} is not valid {'YAML' if p.suffix in ('.yaml', '.yml') else 'JSON'}: {err}"
        ) from None
    if not isinstance(data, dict) or set(data) - {"set", "grid"}:
        raise ConfigError(
            f"sweep file {path} must be a mapping with keys 'set' and/or 'grid', e.g. "
            '{"set": {"epochs": 20}, "grid": {"lr": [1e-3, 3e-3], "rank": [4, 8]}}'
        )
    settings = data.get("set") or {}
    grid = data.get("grid") or {}
    if (
        not isinstance(settings, dict)
        or not isinstance(grid, dict)
        or not all(isinstance(v, list) for v in grid.values())
    ):
        raise ConfigError(f"sweep file {path}: 'set' maps keys to values and 'grid' maps keys to lists of values")
    return settings, grid
