"""Tap discovery: which activations of a timm model featcache stores, and how it reads them.

``Taps`` maps a batch of images (N, 3, H, W) to a dict of tap tensors (N, T, C). It learns the taps
from one probe forward at construction and reads them the same way ever after:

- **token taps** (``kind == "vit"``): isotropic token models, whose every block keeps one width and
  one token grid and whose ``forward_intermediates`` speaks ``output_fmt="NLC"`` (ViT, DeiT, EVA,
  BEiT, relative-position ViTs, CaiT, XCiT, ConViT, TNT, MLP-Mixer, ...). Tap 0 (``embed``) is the
  input of ``blocks[0]`` (when the model has one that takes the tokens), tap k (``block{k}``) the
  output of block k; prefix tokens (class, distillation, register tokens) stay in front of the patch
  tokens. Tokens are stored whole (``pooling == "none"``).
- **map taps** (``kind == "cnn"``): everything else -- CNNs, hierarchical transformers and hybrids
  (Swin, MaxViT, CoAtNet, Hiera, PiT, LeViT, ...). Every feature map of ``forward_intermediates``
  (``stem``, ``stage{k}``) is average-pooled to at most ``cnn_grid`` x ``cnn_grid`` tokens.
- **head**: the model's final features (``forward_features``), when they hold more than the last tap:
  a final norm or head convolution (Swin, EfficientNet), or tokens added after the blocks (CaiT's and
  XCiT's class-attention tails, PiT's class tokens). Its prefix tokens may differ from the other taps'.

Layouts are never guessed from the shape alone: each map's channel dimension is found by comparing
with the model's ``feature_info`` widths (``num_features`` for the final features), which tells NCHW
from NHWC (Swin, MambaOut, Sequencer and Hiera give NHWC final features), and the token view of a
token model is checked against its map view at probe time.

A model whose ``forward_intermediates`` is missing or fails is read through forward hooks at its
``feature_info`` modules, as timm's own ``features_only=True`` does (``source == "feature_info hooks"``).
"""

from __future__ import annotations

import inspect
import logging
from dataclasses import dataclass, replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .errors import FeatcacheError, ModelError, UsageError
from .manifest import TapInfo, pool_windows

log = logging.getLogger(__name__)

FORWARD_INTERMEDIATES = "forward_intermediates"
FEATURE_HOOKS = "feature_info hooks"
MAX_PREFIX_TOKENS = 16  # class + distillation + register tokens; more leading tokens is not a prefix
SUPPORTED = (
    "timm models with forward_intermediates() (every timm >= 1.0 model: ViTs, CNNs, hierarchical "
    "transformers) or with feature_info (read through forward hooks, like features_only=True)"
)


# ---------------------------------------------------------------------------------------------
# Layouts


class LayoutError(ValueError):
    """An output whose shape does not fit the widths the model declares."""


class ForwardError(RuntimeError):
    """The model's own forward pass fails on the probe input (an input size it does not take)."""


@dataclass(frozen=True)
class _Read:
    """How one tap is read from the model's outputs.

    role: "embed" (input of blocks[0]), "inter" (intermediate ``index``), "head" (final features).
    layout of the raw output: "NCHW" | "NHWC" maps, "NLC" tokens (``prefix`` leading prefix tokens, then
    an ``hw`` grid), "PREFIX" (only prefix tokens: the spatial tokens are the last intermediate's).
    """

    role: str
    index: int = -1
    layout: str = "NCHW"
    prefix: int = 0
    hw: tuple[int, int] = (0, 0)


@dataclass
class Feature:
    """One activation in canonical form: a map (N, C, H, W) and the prefix tokens (N, P, C) beside it."""

    spatial: Tensor
    prefix: Tensor | None = None

    @property
    def hw(self) -> tuple[int, int]:
        return (int(self.spatial.shape[2]), int(self.spatial.shape[3]))

    @property
    def channels(self) -> int:
        return int(self.spatial.shape[1])

    @property
    def signature(self) -> tuple[int, int, int, int]:
        """(channels, H, W, prefix tokens): what must agree for two activations to be alike."""
        return (self.channels, *self.hw, 0 if self.prefix is None else int(self.prefix.shape[1]))

    @property
    def token_shape(self) -> tuple[int, int, int]:
        n, c, h, w = self.spatial.shape
        return (int(n), self.signature[3] + int(h * w), int(c))

    def tokens(self) -> Tensor:
        return _cat(self.prefix, self.spatial.flatten(2).transpose(1, 2))  # (N, P + H*W, C)


def _split(item: Any, read: _Read) -> Feature:
    """A raw output in ``read``'s layout -> Feature."""
    spatial, prefix = _unpair(item)
    if read.layout == "NLC":
        if read.prefix:
            prefix, spatial = spatial[:, : read.prefix], spatial[:, read.prefix :]
        n, _, c = spatial.shape
        return Feature(spatial.transpose(1, 2).reshape(n, c, *read.hw), prefix)
    return Feature(_nchw(spatial, read.layout), prefix)


def _token_grid(n_tokens: int, size: torch.Size, reduction: int) -> tuple[tuple[int, int], int]:
    """(grid, prefix tokens) of hooked tokens from the input size and the declared stride."""
    for h in sorted({size[0] // reduction, -(-size[0] // reduction)}):
        for w in sorted({size[1] // reduction, -(-size[1] // reduction)}):
            if 0 <= n_tokens - h * w <= MAX_PREFIX_TOKENS:
                return (h, w), n_tokens - h * w
    raise LayoutError(f"{n_tokens} tokens do not fit a grid of stride {reduction} on a {tuple(size)} input")


def _unpair(item: Any) -> tuple[Tensor, Tensor | None]:
    """forward_intermediates item -> (spatial, prefix tokens or None); with return_prefix_tokens it is a pair."""
    if isinstance(item, (tuple, list)):
        if len(item) == 2 and torch.is_tensor(item[0]) and (item[1] is None or torch.is_tensor(item[1])):
            return item[0], item[1]
        if item and torch.is_tensor(item[0]):  # a module returning (features, extras), e.g. PiT stages via hooks
            return item[0], None
        raise LayoutError(f"an intermediate output is a {type(item).__name__}, not a tensor")
    if not torch.is_tensor(item):
        raise LayoutError(f"an intermediate output is a {type(item).__name__}, not a tensor")
    return item, None


def map_layout(t: Tensor, channels: int | None, declared: str | None = "NCHW") -> str:
    """ "NCHW" or "NHWC": which dimension of the 4-D map ``t`` holds the ``channels`` the model declares.

    When both could (a 16x16 map of 16 channels), ``declared`` decides: the layout asked of timm, or the
    model's own ``output_fmt``; with ``declared=None`` the answer is then "either" (the caller decides).
    ``channels`` None (nothing declared): ``declared``.
    """
    if t.dim() != 4:
        raise LayoutError(f"expected a 4-D feature map, got shape {tuple(t.shape)}")
    if channels is None:
        return declared or "NCHW"
    first, last = t.shape[1] == channels, t.shape[3] == channels
    if first and last:
        return declared or "either"
    if first or last:
        return "NCHW" if first else "NHWC"
    raise LayoutError(
        f"a feature map of shape {tuple(t.shape)} has no dimension of {channels} channels, the width "
        "the model declares for it"
    )


def _nchw(t: Tensor, layout: str) -> Tensor:
    return t.permute(0, 3, 1, 2) if layout == "NHWC" else t  # (N, C, H, W)


def _same(a: Tensor, b: Tensor) -> bool:
    """Bitwise equal values (NaN equals NaN: a broken backbone is reported at extraction, not here)."""
    return a.shape == b.shape and torch.allclose(a, b, rtol=0, atol=0, equal_nan=True)


def _cat(prefix: Tensor | None, tokens: Tensor) -> Tensor:
    return tokens if prefix is None or prefix.shape[1] == 0 else torch.cat([prefix, tokens], dim=1)


def _num_prefix(model: nn.Module) -> int:
    n = getattr(model, "num_prefix_tokens", 0)
    return int(n) if isinstance(n, int) else 0


def _first_block(model: nn.Module) -> nn.Module | None:
    blocks = getattr(model, "blocks", None)
    if isinstance(blocks, (nn.Sequential, nn.ModuleList)) and len(blocks) > 0:
        return blocks[0]
    return None


# ---------------------------------------------------------------------------------------------
# Taps


class Taps(nn.Module):
    """images (N, 3, H, W) -> {tap name: (N, T, C)} for the selected tap positions (see the module doc)."""

    def __init__(
        self,
        model: nn.Module,
        cnn_grid: int = 7,
        positions: list[int] | str | None = None,
        probe_size: tuple[int, int, int] = (3, 224, 224),
        pool_tokens: int = 1,
    ) -> None:
        super().__init__()
        self.model = model
        self.cnn_grid, self.pool_tokens = cnn_grid, pool_tokens
        has_fi = callable(getattr(model, "forward_intermediates", None))
        self.source = FORWARD_INTERMEDIATES if has_fi else FEATURE_HOOKS
        self.fallback_reason: str | None = None if has_fi else "the model has no forward_intermediates()"
        self.kind = "cnn"
        self._reads: list[_Read] = []  # one per tap position
        self._final: _Read | None = None  # the final features' layout, also when they are no tap
        self._fi_kwargs: dict[str, Any] = {}
        self._hooks: list[tuple[str, str]] = []  # (module name, hook type) per feature_info entry
        self.read_infos = self._probe(probe_size)  # the taps as read, before --pool-tokens
        self.all_infos = [pooled_info(t, pool_tokens) for t in self.read_infos]
        self.select(positions)

    @property
    def _device(self) -> torch.device:
        p = next(self.model.parameters(), None)
        return p.device if p is not None else torch.device("cpu")

    # -- discovery
    def _probe(self, probe_size: tuple[int, int, int]) -> list[TapInfo]:
        gen = torch.Generator().manual_seed(0)  # random, not zeros: equal outputs then mean equal functions
        x = torch.randn(1, *probe_size, generator=gen).to(self._device)
        fi_error: Exception | None = None
        with torch.inference_mode():
            if self.source == FORWARD_INTERMEDIATES:
                try:
                    feats, final = self._probe_intermediates(x)
                    return self._finish_probe(x, feats, final)
                except FeatcacheError:
                    raise
                except Exception as err:  # timm asserts, TypeErrors, our LayoutError: try the hooks
                    fi_error = err
                    self.fallback_reason = f"forward_intermediates failed ({type(err).__name__}: {str(err)[:160]})"
                    log.debug("%s; reading feature_info hooks instead", self.fallback_reason)
                    self.source, self.kind, self._reads, self._final = FEATURE_HOOKS, "cnn", [], None
            try:
                feats, final = self._probe_hooks(x)
                return self._finish_probe(x, feats, final)
            except Exception as err:
                if isinstance(err, RuntimeError):  # the plain forward fails too (input size): say that
                    raise err from None
                if isinstance(fi_error, RuntimeError):
                    raise fi_error from None
                if isinstance(err, FeatcacheError):
                    raise
                if fi_error is not None:
                    raise LayoutError(
                        f"{self.fallback_reason}; the feature_info hooks failed too "
                        f"({type(err).__name__}: {str(err)[:120]})"
                    ) from None
                raise

    def _expected_channels(self, n: int) -> list[int | None]:
        """The width feature_info declares for each of the n intermediates (None where it declares none)."""
        info = getattr(self.model, "feature_info", None) or []
        if not isinstance(info, list):
            return [None] * n
        if self._fi_kwargs.get("extra_blocks"):  # every block: feature_info marks the stage ends among them
            out: list[int | None] = [None] * n
            for d in info:
                if isinstance(d.get("stage"), int) and 0 <= d["stage"] < n:
                    out[d["stage"]] = int(d["num_chs"])
            return out
        return [int(d["num_chs"]) for d in info] if len(info) == n else [None] * n

    def _call(self, x: Tensor, indices: list[int] | None, head: bool, fmt: str) -> tuple[Any, list[Any]]:
        """forward_intermediates -> (final features or None, intermediates)."""
        kw = dict(
            indices=indices,
            norm=False,
            stop_early=not head,
            intermediates_only=not head,
            output_fmt=fmt,
            **self._fi_kwargs,
        )
        if fmt != "NCHW":
            kw.pop("extra_blocks", None)
        res = self.model.forward_intermediates(x, **kw)
        return (res[0], list(res[1])) if head else (None, list(res))

    def _probe_intermediates(self, x: Tensor) -> tuple[list[Feature], Any]:
        """Maps of every intermediate (NCHW, layouts checked against feature_info); decides the tap kind."""
        params = inspect.signature(self.model.forward_intermediates).parameters
        if "extra_blocks" in params:  # EfficientNet, MobileNet: the stem and every stage, not only feature_info's
            self._fi_kwargs["extra_blocks"] = True
        if "return_prefix_tokens" in params and _num_prefix(self.model) > 0:
            self._fi_kwargs["return_prefix_tokens"] = True
        with _Capture(_first_block(self.model)) as embed:
            final, inter = self._call(x, None, head=True, fmt="NCHW")
        expected = self._expected_channels(len(inter))
        feats = []
        for i, item in enumerate(inter):
            spatial, prefix = _unpair(item)
            read = _Read("inter", i, map_layout(spatial, expected[i], "NCHW"))  # asked NCHW
            self._reads.append(read)
            feats.append(Feature(_nchw(spatial, read.layout), prefix))
        if len({f.signature for f in feats}) == 1 and self._tokens_match(x, feats[-1], len(feats) - 1):
            self.kind = "vit"
            self._reads = [_Read("inter", i, "NLC", hw=f.hw) for i, f in enumerate(feats)]
            if embed and torch.is_tensor(embed[0]) and tuple(embed[0].shape) == feats[0].token_shape:
                self._reads.insert(0, _Read("embed", hw=feats[0].hw))
        return feats, final

    def _tokens_match(self, x: Tensor, feat: Feature, index: int) -> bool:
        """The model gives intermediate ``index`` as tokens (output_fmt="NLC") equal to its map view ``feat``."""
        try:
            _, out = self._call(x, [index], head=False, fmt="NLC")
            spatial, prefix = _unpair(out[-1])
        except Exception:  # timm asserts the formats it supports
            return False
        tokens, want = _cat(prefix, spatial), feat.tokens()
        return tokens.shape == want.shape and torch.allclose(tokens, want, equal_nan=True)

    def _probe_hooks(self, x: Tensor) -> tuple[list[Feature], Any]:
        """The fallback: forward hooks at the feature_info modules, as timm's features_only=True uses them."""
        info = getattr(self.model, "feature_info", None)
        if not isinstance(info, list) or not info:
            raise ModelError(
                f"{type(self.model).__name__} has no usable forward_intermediates() "
                f"({self.fallback_reason}) and no feature_info to hook; featcache supports {SUPPORTED}"
            )
        self._hooks = [(str(d["module"]), str(d.get("hook_type", "forward"))) for d in info]
        final, raw = self._run_hooks(x, list(range(len(info))))
        reads = []
        for i, (item, d) in enumerate(zip(raw, info)):
            spatial, _ = _unpair(item)
            if spatial.dim() == 3:  # tokens: the grid follows from the input size and the declared stride
                hw, prefix = _token_grid(spatial.shape[1], x.shape[-2:], int(d["reduction"]))
                reads.append(_Read("inter", i, "NLC", prefix, hw))
            else:
                reads.append(_Read("inter", i, map_layout(spatial, int(d["num_chs"]), None)))
        # a map whose layout its shape leaves open (C == H == W) is laid out as the model's other maps are
        known = {r.layout for r in reads if r.layout in ("NCHW", "NHWC")}
        fallback = known.pop() if len(known) == 1 else getattr(self.model, "output_fmt", None) or "NCHW"
        feats = []
        for item, d, read in zip(raw, info, reads):
            read = _Read("inter", read.index, fallback) if read.layout == "either" else read
            feat = _split(item, read)
            if feat.spatial.shape[1] != int(d["num_chs"]):
                raise LayoutError(
                    f"feature_info module {d['module']!r} gives {feat.spatial.shape[1]} channels, "
                    f"not the declared {d['num_chs']}"
                )
            self._reads.append(read)
            feats.append(feat)
        return feats, final

    def _finish_probe(self, x: Tensor, feats: list[Feature], final: Any) -> list[TapInfo]:
        """Add the head tap when the final features hold more than the last tap; measure every tap."""
        self._final = self._final_read(final, feats[-1])
        if self._final is not None and self._adds_to(self._final, final, feats[-1]):
            self._reads.append(self._final)
        grids = [self._grid(r, feats, final) for r in self._reads]
        outs = self._forward(x, self._reads)
        infos = []
        for pos, (read, grid, t) in enumerate(zip(self._reads, grids, outs)):
            prefix = t.shape[1] - grid[0] * grid[1]
            name, block = self._name(pos, read, len(feats))
            if not 0 <= prefix <= MAX_PREFIX_TOKENS or t.dim() != 3:
                raise LayoutError(f"tap {name} of shape {tuple(t.shape)} is not a {grid} grid plus prefix tokens")
            infos.append(
                TapInfo(
                    name=name,
                    position=pos,
                    block=block,
                    tokens=t.shape[1],
                    prefix_tokens=prefix,
                    channels=t.shape[2],
                    grid=grid,
                    pooling="none" if self.kind == "vit" else "avg",
                )
            )
        return infos

    def _name(self, pos: int, read: _Read, n_inter: int) -> tuple[str, int]:
        """(tap name, blocks or stages run before it)."""
        if read.role == "head":
            return "head", (n_inter + 1 if self.kind == "vit" else pos)
        if self.kind == "vit":
            return ("embed", 0) if read.role == "embed" else (f"block{read.index + 1}", read.index + 1)
        return ("stem" if pos == 0 else f"stage{pos}"), pos

    def _grid(self, read: _Read, feats: list[Feature], final: Any) -> tuple[int, int]:
        """The spatial token grid (h, w) of a tap: the map's own (token taps) or pooled (map taps)."""
        if read.role == "embed":
            hw = feats[0].hw
        elif read.role == "inter":
            hw = feats[read.index].hw
        else:
            hw = self._head_feature(read, final, feats[-1].spatial).hw
        return hw if self.kind == "vit" else (min(hw[0], self.cnn_grid), min(hw[1], self.cnn_grid))

    def _final_read(self, final: Any, last: Feature) -> _Read | None:
        """How to read the final features, or None when they are not a tensor featcache understands."""
        if not torch.is_tensor(final):  # e.g. CrossViT's list of branch outputs: the intermediates have it all
            return None
        width = getattr(self.model, "num_features", None)
        width = width if isinstance(width, int) else last.channels
        try:
            if final.dim() == 4:
                return _Read("head", layout=map_layout(final, width, getattr(self.model, "output_fmt", None) or "NCHW"))
        except LayoutError as err:
            log.debug("final features are no tap: %s", err)
            return None
        if final.dim() != 3 or final.shape[2] not in (width, last.channels):
            return None
        extra = final.shape[1] - last.hw[0] * last.hw[1]
        if 0 <= extra <= MAX_PREFIX_TOKENS:
            return _Read("head", layout="NLC", prefix=extra, hw=last.hw)
        if final.shape[1] <= MAX_PREFIX_TOKENS and final.shape[2] == last.channels and self.kind == "cnn":
            return _Read("head", layout="PREFIX")  # PiT: the class (and distillation) tokens only
        return None

    def _adds_to(self, read: _Read, final: Tensor, last: Feature) -> bool:
        """Whether the final features hold something the last tap does not (a norm, a head conv, tokens)."""
        head = self._head_feature(read, final, last.spatial)
        if head.signature != last.signature:
            return True
        if self.kind == "vit":  # the same tokens through the final norm: side networks apply their own norm
            return False
        same_prefix = last.prefix is None or _same(head.prefix, last.prefix)
        return not (same_prefix and _same(head.spatial, last.spatial))

    @staticmethod
    def _head_feature(read: _Read, final: Tensor, last_spatial: Tensor) -> Feature:
        if read.layout == "PREFIX":
            return Feature(last_spatial, final)
        return _split(final, read)

    def select(self, positions: list[int] | str | None) -> None:
        """Restrict to the given tap positions (None = all; "every:G": see ``every_gth``)."""
        n = len(self.all_infos)
        if isinstance(positions, str):
            positions = every_gth(self.all_infos, positions)
        positions = list(range(n)) if positions is None else list(positions)
        bad = [p for p in positions if not 0 <= p < n]
        if bad or not positions:
            raise UsageError(
                f"--layers {','.join(map(str, positions)) or '(none)'} is out of range: this "
                f"{self.kind.upper()} has taps 0..{n - 1} ({self.all_infos[0].name} .. "
                f"{self.all_infos[-1].name}); use --layers all or indices in that range"
            )
        if len(set(positions)) != len(positions):
            raise UsageError(f"--layers lists a tap twice: {positions}")
        self.positions = sorted(positions)
        self.infos = [self.all_infos[p] for p in self.positions]

    # -- forward
    def forward(self, images: Tensor) -> dict[str, Tensor]:
        outs = self._forward(images, [self._reads[p] for p in self.positions])
        if self.pool_tokens > 1:
            outs = [pool_token_grid(t, self.read_infos[p], self.pool_tokens) for p, t in zip(self.positions, outs)]
        return {info.name: t.contiguous() for info, t in zip(self.infos, outs)}

    @property
    def _last_index(self) -> int:
        return max(r.index for r in self._reads if r.role == "inter")

    def _forward(self, x: Tensor, reads: list[_Read]) -> list[Tensor]:
        """One model pass -> one (N, T, C) tensor per read."""
        head = next((r for r in reads if r.role == "head"), None)
        wanted = {r.index for r in reads if r.role == "inter"}
        if head is not None and head.layout == "PREFIX":
            wanted.add(self._last_index)  # the head's spatial tokens are the last intermediate's
        indices = sorted(wanted) or [0]
        embed: list[Tensor] = []
        if self.source == FORWARD_INTERMEDIATES:
            block0 = _first_block(self.model) if any(r.role == "embed" for r in reads) else None
            with _Capture(block0) as embed:
                fmt = "NLC" if self.kind == "vit" else "NCHW"
                final, inter = self._call(x, indices, head=head is not None, fmt=fmt)
        else:
            final, inter = self._run_hooks(x, indices)
        raw = dict(zip(indices, inter))
        return [self._read(r, final, raw, embed) for r in reads]

    def _read(self, read: _Read, final: Any, raw: dict[int, Any], embed: list[Tensor]) -> Tensor:
        if read.role == "embed":
            return embed[0]  # (N, P + H*W, C)
        if read.role == "inter" and self.kind == "vit":
            spatial, prefix = _unpair(raw[read.index])
            return _cat(prefix, spatial)  # (N, P + H*W, C) as the model gives them
        if read.role == "inter":
            return self._tokens(_split(raw[read.index], read))
        if self.kind == "vit" and read.layout == "NLC":
            return final  # (N, P + H*W, C)
        if read.layout == "PREFIX":  # class tokens (N, P, C) in front of the last map's tokens
            last = next(r for r in self._reads if r.role == "inter" and r.index == self._last_index)
            return self._tokens(Feature(_split(raw[last.index], last).spatial, final))
        return self._tokens(_split(final, read))

    def _tokens(self, feat: Feature) -> Tensor:
        """Feature -> (N, P + h*w, C): flattened (token taps) or pooled to <= cnn_grid (map taps)."""
        if self.kind == "vit":
            return feat.tokens()
        fmap = F.adaptive_avg_pool2d(feat.spatial, (min(feat.hw[0], self.cnn_grid), min(feat.hw[1], self.cnn_grid)))
        return _cat(feat.prefix, fmap.flatten(2).transpose(1, 2))  # (N, P + h*w, C)

    def _run_hooks(self, x: Tensor, indices: list[int]) -> tuple[Any, list[Any]]:
        """Forward hooks at the feature_info modules ``indices``; returns (forward_features output, hooked outputs).

        Not timm's ``FeatureHooks``: those stay registered for the model's life and collect on every forward
        (the plain forwards of predict and the tests included); these exist for one call."""
        got: dict[int, Any] = {}
        handles = []
        try:
            for i in indices:
                name, kind = self._hooks[i]
                module = self.model.get_submodule(name)
                if kind == "forward_pre":
                    handles.append(module.register_forward_pre_hook(lambda _m, a, i=i: got.setdefault(i, a[0])))
                else:
                    handles.append(module.register_forward_hook(lambda _m, _a, out, i=i: got.setdefault(i, out)))
            try:
                final = getattr(self.model, "forward_features", self.model)(x)
            except Exception as err:  # the model itself does not run on this input (timm asserts sizes)
                raise ForwardError(f"{type(err).__name__}: {err}") from err
        finally:
            for h in handles:
                h.remove()
        missing = [self._hooks[i][0] for i in indices if i not in got]
        if missing:
            raise LayoutError(f"feature_info modules {missing} did not run in forward_features()")
        return final, [got[i] for i in indices]

    # -- the model's own output from taps (tests: tapped forward == plain forward)
    def final_from_tap(self, t: Tensor) -> Tensor:
        """The last tap (N, T, C) back in the layout of the model's final features, for ``forward_head``.

        Exact only when the final features are the last tap (a head tap, or equal to the last intermediate)
        and were not pooled (their map was no larger than ``cnn_grid``, and no ``pool_tokens``)."""
        info, read = self.all_infos[-1], self._reads[-1]
        final = read if read.role == "head" else self._final
        if final is None:
            raise ModelError("the model's final features are not a tensor featcache can rebuild from the taps")
        p = info.prefix_tokens
        if final.layout == "PREFIX":
            return t[:, :p]
        if final.layout == "NLC":
            return t
        fmap = t[:, p:].transpose(1, 2).reshape(t.shape[0], t.shape[2], *info.grid)  # (N, C, h, w)
        return fmap.permute(0, 2, 3, 1) if final.layout == "NHWC" else fmap


def pooled_info(info: TapInfo, k: int) -> TapInfo:
    """The TapInfo of ``info`` after ``pool_token_grid(.., k)``: the patch grid ceil-divided by k, prefix kept,
    and the window sizes recorded (``windows``) so that token means can weigh each token by what it averages."""
    if k == 1:
        return info
    windows = (pool_windows(info.grid[0], k), pool_windows(info.grid[1], k))
    grid = (len(windows[0]), len(windows[1]))
    return replace(info, grid=grid, tokens=info.prefix_tokens + grid[0] * grid[1], pooling="avg", windows=windows)


def pool_token_grid(t: Tensor, info: TapInfo, k: int) -> Tensor:
    """(N, p + h * w, C) -> (N, p + ceil(h/k) * ceil(w/k), C): each k x k window of patch tokens averaged, prefix
    tokens kept. A grid that k does not divide ends in narrower windows (7x7 at k=2: 4x4, the last row and
    column of windows average 2 or 1 tokens)."""
    p, (h, w) = info.prefix_tokens, info.grid
    fmap = t[:, p:].transpose(1, 2).reshape(t.shape[0], t.shape[2], h, w)  # (N, C, h, w)
    pooled = F.avg_pool2d(fmap, k, k, ceil_mode=True).flatten(2).transpose(1, 2)  # (N, h'w', C)
    return torch.cat([t[:, :p], pooled], dim=1) if p else pooled


def every_gth(infos: list[TapInfo], text: str) -> list[int]:
    """``--layers every:G``: the embedding / stem tap, the last tap, and every G-th block counted back from the
    last block (blocks L, L-G, L-2G, ...): the taps LAST with gap G reads. A head tap counts as the last."""
    try:
        gap = int(text.split(":", 1)[1])
    except (IndexError, ValueError):
        gap = 0
    if not text.startswith("every:") or gap < 1:
        raise UsageError(f"--layers {text!r}: write every:G with a whole G >= 1 (e.g. every:2), 'all' or tap indices")
    last = max(t.block for t in infos)
    return sorted({0, len(infos) - 1} | {t.position for t in infos if (last - t.block) % gap == 0 and t.block > 0})


class _Capture:
    """Context manager: a forward pre-hook on ``module`` (or nothing) collecting its first input."""

    def __init__(self, module: nn.Module | None) -> None:
        self.module, self.got, self.handle = module, [], None

    def __enter__(self) -> list[Tensor]:
        if self.module is not None:
            self.handle = self.module.register_forward_pre_hook(
                lambda _m, args: self.got.append(args[0]) if args and not self.got else None
            )
        return self.got

    def __exit__(self, *exc: Any) -> None:
        if self.handle is not None:
            self.handle.remove()


__all__ = [
    "FEATURE_HOOKS",
    "FORWARD_INTERMEDIATES",
    "LayoutError",
    "SUPPORTED",
    "Taps",
    "every_gth",
    "map_layout",
    "pool_token_grid",
    "pooled_info",
]
