"""Side networks, one module per method, registered by name: ``linear``, ``last``, ``lst``.

    from featcache.methods import MethodInput, create
    net = create("last", {"rank": 16}, MethodInput(taps=store_taps, num_classes=10, backbone_kind="vit"))
    logits = net({name: tensor for name in net.required_taps})  # (N, T, C) each -> (N, 10)

See docs/methods.md for the equations, the defaults and how they were chosen.
"""

from __future__ import annotations

from . import last, linear, lst  # noqa: F401  (each module registers its method)
from .base import TRAINING_KEYS, MethodConfig, MethodInput, SideNetwork, config_class, create, list_methods, register
from .last import LAST, LASTConfig
from .linear import LinearConfig, LinearProbe
from .lst import LST, LSTConfig

__all__ = [
    "TRAINING_KEYS",
    "MethodConfig",
    "MethodInput",
    "SideNetwork",
    "config_class",
    "create",
    "list_methods",
    "register",
    "LAST",
    "LASTConfig",
    "LinearConfig",
    "LinearProbe",
    "LST",
    "LSTConfig",
]
