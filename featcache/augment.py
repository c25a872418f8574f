"""Feature-space augmentation of cached taps, per training batch.

Image augmentation cannot run on a cache (the backbone ran once), but the cached features themselves can
be augmented, as frozen-feature augmentation (FroFA: Bär, Houlsby, Dehghani, Kumar, "Frozen Feature
Augmentation for Few-Shot Image Classification", CVPR 2024, arXiv 2403.10519) does. ``augment`` takes one
batch of taps {name: (B, T, C)} with its labels and returns augmented taps plus a mixing description.
Pure torch: no store, no backbone, no method imports.

Augmentations (``aug``: one name, or several joined by ``+``; applied in the order below whatever the
order of the names, per-sample ones before the batch mixing, as image pipelines do):

- ``frofa`` (channel-wise brightness, optionally contrast; FroFA's c^2FroFA form): FroFA maps a feature to
  a surrogate image, x~ = (x - min_c) / (max_c - min_c) per channel c, applies an image augmentation and
  maps back. Brightness adds delta ~ U(-b, b), drawn per sample and per channel; mapped back this is
  x + delta * (max_c - min_c). Contrast (off by default) scales around the sample's channel mean,
  m + gamma (x - m), gamma ~ U(1 - k, 1 + k). Brightness was the paper's best single augmentation and the
  per-channel draws its best variant. min_c / max_c are statistics of the training features, as in the
  paper: computed once per run over every token, sample and view of the training split (``FeatureStats``,
  ``feature_stats``; featcache.training records them in RUNDIR), never from the batch, so a sample's
  augmentation does not depend on the other samples of its batch or on the batch size. Every token, prefix
  tokens included. A sample's draws (gamma and delta of every tap) are row i of one (B, 2, sum of C) draw:
  the same for sample 0 whatever the batch size.
- ``tokendrop``: round(rate * P) of a sample's P patch tokens are replaced by the mean of its kept patch
  tokens; prefix (CLS, register) tokens are kept. Replacing (instead of removing, which changes T and
  breaks batched shapes, or zeroing with a 1/(1 - p) rescale as dropout does, which puts constant
  LayerNorm(0) = bias tokens in the sequence) keeps T and keeps the tokens in distribution; and mean
  pooling over the patches then equals the mean over the kept tokens, exactly what removal would give.
  The same positions are dropped in every tap: the mask is drawn on the finest token grid among the taps
  and a coarser grid drops a token when the finest-grid token under its centre is dropped. A tap whose
  every patch token would be dropped (1x1 grids) is left unchanged.
- ``mixup``: x = lam x + (1 - lam) x[perm] on every token of every tap, lam ~ Beta(a, a), one lam and one
  permutation per batch (timm's batch mode).
- ``cutmix``: a rectangle of the patch grid comes from the permuted sample. The rectangle is drawn on the
  finest grid (area 1 - lam0, lam0 ~ Beta(a, a), clipped at the border, timm's rule) and every tap mixes
  each token by the fraction of its cell the rectangle covers (0 or 1 on the finest grid; fractions on
  the coarser, average-pooled grids of CNN taps), so every tap mixes exactly the same area 1 - lam of
  the image. Prefix tokens summarise the whole image and are mixed as in mixup with that lam.
  With ``mixup+cutmix`` one of the two is chosen per batch, each with probability 1/2.

Targets: mixing returns (labels, labels_b, lam); the target is lam * onehot(labels) + (1 - lam) *
onehot(labels_b). Cross-entropy is linear in the target, so the loss is
``lam * loss(logits, labels) + (1 - lam) * loss(logits, labels_b)`` for any per-label loss, label
smoothing included (``AugmentedBatch.mix_loss``): K members of a bank share one augmented batch and each
keeps its own label smoothing. ``AugmentedBatch.targets`` gives the soft (B, classes) targets instead.

Determinism: every random draw comes from the ``generator`` argument (none from the global generator),
in a fixed order (taps by position), so the same generator state gives bitwise the same batch. Seed it
from (seed, epoch, step) with ``batch_generator`` and a resumed run augments exactly as the uninterrupted
one. A CPU generator makes the draws (small: masks, deltas, one permutation) on the CPU, and they are moved
to the taps' device: the same seed augments alike on every device.

Strengths (defaults are featcache's choices, not measured here): ``tokendrop_rate`` 0.2 (a fifth of the
patches, in the range of random erasing's areas); ``mixup_alpha`` 0.8 and ``cutmix_alpha`` 1.0 (timm's
and DeiT's values); ``frofa_brightness`` 0.1 (delta up to a tenth of the channel's range: the paper sweeps
this strength per data set); ``frofa_contrast`` 0 (off).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from .errors import ConfigError
from .manifest import TapInfo
from .options import AUG_KEYS, AUGMENTATIONS, AugmentConfig


@dataclass
class AugmentedBatch:
    """Augmented taps and the target description: ``lam * onehot(labels) + (1 - lam) * onehot(labels_b)``."""

    taps: dict[str, Tensor]  # name -> (B, T, C), same shapes and dtypes as the input
    labels: Tensor  # (B,) the input labels
    labels_b: Tensor | None = None  # (B,) labels of the mixed-in samples; None without mixing
    lam: float = 1.0  # weight of ``labels`` in the target

    @property
    def mixed(self) -> bool:
        return self.labels_b is not None

    def mix_loss(self, loss: Callable[[Tensor], Tensor]) -> Tensor:
        """``lam * loss(labels) + (1 - lam) * loss(labels_b)``: the soft-target loss for any per-label loss."""
        if self.labels_b is None:
            return loss(self.labels)
        return self.lam * loss(self.labels) + (1 - self.lam) * loss(self.labels_b)

    def targets(self, num_classes: int, smoothing: float = 0.0) -> Tensor:
        """(B, num_classes) soft targets, label smoothing ``smoothing`` applied after mixing."""
        t = F.one_hot(self.labels, num_classes).float() * self.lam
        if self.labels_b is not None:
            t = t + F.one_hot(self.labels_b, num_classes).float() * (1 - self.lam)
        return t * (1 - smoothing) + smoothing / num_classes


@dataclass
class FeatureStats:
    """FroFA's x_min and x_max: per tap, the per-channel minimum and maximum of the training features (every token,
    sample and view), computed once before training (``feature_stats``)."""

    low: dict[str, Tensor]  # tap -> (C,) float32
    high: dict[str, Tensor]  # tap -> (C,) float32
    samples: int = 0  # feature rows (samples x views) the statistics were taken over
    _spans: dict[tuple[str, str], Tensor] = field(default_factory=dict, repr=False)

    def span(self, name: str, device: torch.device | str = "cpu") -> Tensor:
        """(C,) max_c - min_c of tap ``name`` on ``device`` (moved there once)."""
        if name not in self.low:
            raise ConfigError(
                f"frofa: the feature statistics hold no tap {name!r} (they have "
                f"{', '.join(self.low) or 'none'}); compute them over every tap the batch holds"
            )
        key = (name, str(device))
        if key not in self._spans:
            self._spans[key] = (self.high[name] - self.low[name]).to(device)
        return self._spans[key]

    def to_tensors(self) -> dict[str, Tensor]:
        """{"<tap>/min": (C,), "<tap>/max": (C,)} for a safetensors file."""
        return {**{f"{k}/min": v for k, v in self.low.items()}, **{f"{k}/max": v for k, v in self.high.items()}}

    @classmethod
    def from_tensors(cls, tensors: dict[str, Tensor], samples: int = 0) -> "FeatureStats":
        taps = sorted({k.rsplit("/", 1)[0] for k in tensors})
        return cls(
            {t: tensors[f"{t}/min"].float() for t in taps}, {t: tensors[f"{t}/max"].float() for t in taps}, samples
        )


def feature_stats(batches: Iterable[dict[str, Tensor]]) -> FeatureStats:
    """Per tap and channel, the minimum and maximum over every token of every batch ({tap: (N, T, C)}): one pass."""
    low: dict[str, Tensor] = {}
    high: dict[str, Tensor] = {}
    rows = 0
    for taps in batches:
        for name, x in taps.items():
            lo, hi = torch.aminmax(x.float().reshape(-1, x.shape[-1]), dim=0)
            lo, hi = lo.cpu(), hi.cpu()
            low[name] = torch.minimum(low[name], lo) if name in low else lo
            high[name] = torch.maximum(high[name], hi) if name in high else hi
        rows += next(iter(taps.values())).shape[0] if taps else 0
    if not low:
        raise ConfigError("frofa: no training features to take the channel statistics from")
    return FeatureStats(low, high, rows)


def batch_generator(seed: int, epoch: int, step: int) -> torch.Generator:
    """A CPU generator seeded from (seed, epoch, step): the same batch augments alike in a resumed run."""
    state = np.random.SeedSequence([int(seed) & (2**63 - 1), int(epoch), int(step)]).generate_state(1, np.uint64)[0]
    return torch.Generator().manual_seed(int(state) & (2**63 - 1))


def augment(
    taps: dict[str, Tensor],
    labels: Tensor,
    infos: dict[str, TapInfo],
    cfg: AugmentConfig,
    generator: torch.Generator,
    stats: FeatureStats | None = None,
) -> AugmentedBatch:
    """Augment one batch (module doc). ``infos``: the TapInfo of every tap in ``taps`` (grids, prefix tokens);
    ``stats``: the training features' channel ranges (``feature_stats``), which ``frofa`` needs.

    The input tensors are never modified; ``aug="none"`` returns them as they are.
    """
    if not cfg.names:
        return AugmentedBatch(taps, labels)
    order = _check(taps, labels, infos)
    out = dict(taps)
    if "frofa" in cfg.names:
        if stats is None:
            raise ConfigError(
                "frofa needs the per-channel minimum and maximum of the training features "
                "(augment(..., stats=feature_stats(...))); featcache train computes them once per run"
            )
        widths = [out[n].shape[-1] for n in order]  # one draw for every tap: sample i's draws are row i, whatever B
        draws = (2 * _rand((labels.shape[0], 2, sum(widths)), generator) - 1).split(widths, dim=-1)
        for n, u in zip(order, draws):
            out[n] = shift_channels(out[n], u, cfg.frofa_brightness, cfg.frofa_contrast, stats.span(n, out[n].device))
    if "tokendrop" in cfg.names:
        out = token_drop(out, [infos[n] for n in order], cfg.tokendrop_rate, generator)
    mix = [n for n in ("mixup", "cutmix") if n in cfg.names]
    if len(mix) == 2:
        mix = ["mixup" if float(_rand((1,), generator)[0]) < 0.5 else "cutmix"]
    if not mix:
        return AugmentedBatch(out, labels)
    batch = labels.shape[0]
    perm = torch.randperm(batch, generator=generator, device=generator.device).to(labels.device)
    if mix[0] == "mixup":
        lam = _beta(cfg.mixup_alpha, generator)
        out = {n: lam * x + (1 - lam) * x[perm.to(x.device)] for n, x in out.items()}
    else:
        out, lam = cutmix(out, [infos[n] for n in order], perm, _beta(cfg.cutmix_alpha, generator), generator)
    return AugmentedBatch(out, labels, labels[perm], lam)


# ---------------------------------------------------------------------------------------------
# The augmentations


def frofa(x: Tensor, brightness: float, contrast: float, generator: torch.Generator, span: Tensor) -> Tensor:
    """Channel-wise FroFA on (B, T, C): m + gamma (x - m) + delta span, per sample and channel; ``span`` (C,): the
    training features' max_c - min_c (``FeatureStats.span``)."""
    b, _, c = x.shape
    return shift_channels(x, 2 * _rand((b, 2, c), generator) - 1, brightness, contrast, span)


def shift_channels(x: Tensor, u: Tensor, brightness: float, contrast: float, span: Tensor) -> Tensor:
    """FroFA on (B, T, C) with the draws ``u`` (B, 2, C) in [-1, 1): gamma = 1 + u[:, 0] contrast, delta =
    u[:, 1] brightness."""
    c = x.shape[-1]
    if span.shape != (c,):
        raise ConfigError(f"frofa: the channel span has shape {tuple(span.shape)}, the tap has {c} channels")
    u = u.to(x.device)
    xf = x.float()
    out = xf
    if contrast > 0:
        gamma = 1 + u[:, :1] * contrast  # (B, 1, C)
        mean = xf.mean(dim=1, keepdim=True)  # (B, 1, C)
        out = mean + gamma * (xf - mean)
    if brightness > 0:
        out = out + u[:, 1:] * brightness * span.to(x.device, torch.float32)  # (B, 1, C) x (C,)
    return out.to(x.dtype)


def token_drop(
    taps: dict[str, Tensor], infos: list[TapInfo], rate: float, generator: torch.Generator
) -> dict[str, Tensor]:
    """Replace round(rate * P) patch tokens per sample by the mean of the kept ones (pooled windows weighing by
    size), same positions in every tap."""
    ref = _finest_grid(infos)
    p_ref = ref[0] * ref[1]
    k = int(round(rate * p_ref))
    if k == 0:
        return dict(taps)
    batch = taps[infos[0].name].shape[0]
    u = _rand((batch, p_ref), generator)  # (B, P_ref), on the generator's device
    dropped = torch.zeros(batch, p_ref, dtype=torch.bool, device=u.device)
    dropped.scatter_(1, u.argsort(dim=1)[:, :k], True)  # the k lowest draws
    out = dict(taps)
    for info in infos:
        x = taps[info.name]  # (B, T, C)
        h, w = info.grid
        if (h, w) == tuple(ref):
            drop = dropped
        else:  # the finest-grid token under each cell's centre decides
            rows = ((torch.arange(h, device=u.device) + 0.5) * ref[0] / h).long()
            cols = ((torch.arange(w, device=u.device) + 0.5) * ref[1] / w).long()
            drop = dropped.view(batch, *ref)[:, rows][:, :, cols].reshape(batch, h * w)
        drop = drop & ~drop.all(dim=1, keepdim=True)  # never every patch token of a sample
        drop = drop.to(x.device)
        p = info.prefix_tokens
        patches = x[:, p:].float()  # (B, P, C)
        keep = (~drop).unsqueeze(-1).float()  # (B, P, 1)
        weights = info.patch_weights()  # pooled windows of different sizes weigh by size
        if weights is not None:
            keep = keep * torch.tensor(weights, device=keep.device).view(1, -1, 1)
        mean = (patches * keep).sum(dim=1, keepdim=True) / keep.sum(dim=1, keepdim=True)  # (B, 1, C)
        new = torch.where(drop.unsqueeze(-1), mean, patches).to(x.dtype)
        out[info.name] = torch.cat([x[:, :p], new], dim=1) if p else new
    return out


def cutmix(
    taps: dict[str, Tensor], infos: list[TapInfo], perm: Tensor, lam0: float, generator: torch.Generator
) -> tuple[dict[str, Tensor], float]:
    """A rectangle of area ~(1 - lam0) of the patch grid from sample perm[i]; returns the taps and the exact lam."""
    hr, wr = _finest_grid(infos)
    cut = math.sqrt(1 - lam0)
    ch, cw = int(round(hr * cut)), int(round(wr * cut))
    centre = _rand((2,), generator)
    cy, cx = int(centre[0] * hr), int(centre[1] * wr)  # uniform cell of the finest grid
    y0, y1 = min(max(cy - ch // 2, 0), hr), min(max(cy + ch - ch // 2, 0), hr)
    x0, x1 = min(max(cx - cw // 2, 0), wr), min(max(cx + cw - cw // 2, 0), wr)
    lam = 1 - (y1 - y0) * (x1 - x0) / (hr * wr)
    out = dict(taps)
    for info in infos:
        x = taps[info.name]  # (B, T, C)
        h, w = info.grid
        cover = (_overlap(h, hr, y0, y1)[:, None] * _overlap(w, wr, x0, x1)[None, :]).reshape(1, h * w, 1)  # (1, P, 1)
        cover = cover.to(device=x.device, dtype=torch.float32)
        xf, xb = x.float(), x[perm.to(x.device)].float()
        p = info.prefix_tokens
        patches = (1 - cover) * xf[:, p:] + cover * xb[:, p:]
        prefix = lam * xf[:, :p] + (1 - lam) * xb[:, :p]
        out[info.name] = torch.cat([prefix, patches], dim=1).to(x.dtype)
    return out, lam


# ---------------------------------------------------------------------------------------------
# Helpers


def _check(taps: dict[str, Tensor], labels: Tensor, infos: dict[str, TapInfo]) -> list[str]:
    """Tap names in a fixed order (by position); shapes checked against the infos."""
    missing = [n for n in taps if n not in infos]
    if missing:
        raise ConfigError(
            f"augment: no TapInfo for tap(s) {', '.join(map(repr, missing))}; pass the store's tap "
            "infos for every tap in the batch"
        )
    if labels.dim() != 1:
        raise ConfigError(f"augment: labels must be (B,), got shape {tuple(labels.shape)}")
    for n, x in taps.items():
        info = infos[n]
        if x.dim() != 3 or tuple(x.shape[1:]) != (info.tokens, info.channels) or x.shape[0] != labels.shape[0]:
            raise ConfigError(
                f"augment: tap {n!r} has shape {tuple(x.shape)}, expected ({labels.shape[0]}, "
                f"{info.tokens}, {info.channels}) from the labels and the store's manifest"
            )
    return sorted(taps, key=lambda n: (infos[n].position, n))


def _rand(shape: tuple[int, ...], generator: torch.Generator) -> Tensor:
    """U[0, 1) draws from ``generator`` on its own device."""
    return torch.rand(shape, generator=generator, device=generator.device)


def _beta(alpha: float, generator: torch.Generator) -> float:
    """A Beta(alpha, alpha) draw seeded from ``generator`` (torch's Beta takes no generator)."""
    seed = int(torch.randint(0, 2**62, (1,), generator=generator, device=generator.device)[0])
    return float(np.random.default_rng(seed).beta(alpha, alpha))


def _finest_grid(infos: list[TapInfo]) -> tuple[int, int]:
    """The token grid with the most cells among ``infos`` (first such in position order)."""
    return tuple(max((t.grid for t in infos), key=lambda g: g[0] * g[1]))  # type: ignore[return-value]


def _overlap(n: int, n_ref: int, lo: int, hi: int) -> Tensor:
    """(n,) fraction of each of n equal cells covered by [lo, hi) of n_ref cells (exact integer arithmetic)."""
    i = torch.arange(n, dtype=torch.float64)
    # in units of 1 / (n * n_ref): cell i spans [i n_ref, (i + 1) n_ref), the interval [lo n, hi n)
    covered = (
        torch.minimum((i + 1) * n_ref, torch.tensor(float(hi * n)))
        - torch.maximum(i * n_ref, torch.tensor(float(lo * n)))
    ).clamp(min=0)
    return covered / n_ref


__all__ = [
    "AUGMENTATIONS",
    "AUG_KEYS",
    "AugmentConfig",
    "AugmentedBatch",
    "FeatureStats",
    "augment",
    "batch_generator",
    "feature_stats",
    "frofa",
    "token_drop",
    "cutmix",
]
