"""The contenders, each a ``Peer`` with one method that matters: ``step()``, one training step of a batch.

- ``featcache-<method>``: featcache's own training path, ``MemberBank.train_step`` on batches from
  ``open_reader`` over the store one extraction wrote (LAST, LST, linear probe; K members for sweeps).
- ``last-in-loop``: the same LAST side network with the backbone in the loop, as the LAST paper runs it:
  each step runs the frozen backbone under ``no_grad`` to get the taps, then LAST forward/backward/AdamW.
- ``lora``: peft LoRA (r=8) on the backbone (ViT: ``qkv``), new classifier trained in full.
- ``full-ft``: every parameter trained.

All of them train with AdamW, weight decay 0.05 on weight matrices, batch ``batch_size``, and on CUDA
under bf16 autocast (featcache's bank autocasts the same way).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from featcache import methods
from featcache.backbone import Backbone
from featcache.member_bank import MemberBank
from featcache.methods.base import MethodInput
from featcache.store.feature_store import FeatureStore
from featcache.store.reader import Batch, CacheReader, open_reader
from featcache.sweep import expand

from .workload import MODELS, ImageBatches, ModelPreset, subset

PEERS = ("featcache-last", "featcache-lst", "featcache-linear", "last-in-loop", "lora", "full-ft")
SIDE_LR = {"last": 1e-3, "lst": 1e-3, "linear": 1e-2}


@dataclass
class PeerContext:
    """Everything a peer is built from; JSON-able, so that a subprocess can rebuild the same peer."""

    model: str  # a key of workload.MODELS
    batch_size: int
    device: str
    store: str = ""  # the extracted store (featcache peers)
    data: str = ""  # data spec of the images (image peers)
    images: int = 0  # how many of them (a fixed stratified subset)
    num_classes: int = 10
    reader: str = "ram"  # featcache reader mode
    reader_options: dict[str, Any] = field(default_factory=dict)  # e.g. {"buffer_mb": 64} for stream
    preload: bool = True  # image peers: transform all images once before timing
    method_config: dict[str, dict[str, Any]] = field(default_factory=dict)  # per side method, e.g. {"last": {...}}
    members: int = 1  # featcache: K members in the bank (an lr grid)

    @property
    def preset(self) -> ModelPreset:
        return MODELS[self.model]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def param_groups(params: list[tuple[str, nn.Parameter]], weight_decay: float = 0.05) -> list[dict[str, Any]]:
    """AdamW groups: decay on weight matrices/kernels (ndim >= 2), none on biases, norms, gates."""
    decay = [p for _, p in params if p.requires_grad and p.ndim >= 2]
    rest = [p for _, p in params if p.requires_grad and p.ndim < 2]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": rest, "weight_decay": 0.0}]


def trainable(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad)


class Peer:
    """One contender: ``step()`` trains on the next batch of ``batch_size`` samples."""

    name = "peer"

    def __init__(self, ctx: PeerContext) -> None:
        self.ctx = ctx
        self.device = torch.device(ctx.device)
        self.batch_size = ctx.batch_size
        self.steps = 0

    def step(self) -> None:
        raise NotImplementedError

    def trainable_params(self) -> int:
        raise NotImplementedError

    def describe(self) -> dict[str, Any]:
        return {"peer": self.name, "trainable_params": self.trainable_params()}


# ---------------------------------------------------------------------------------------------
# featcache


def method_input(store: FeatureStore, split: str = "train") -> MethodInput:
    """What a side network is built from, as ``featcache.training`` builds it from a store."""
    sp = store.split(split)
    labels = sp.labels()
    num_classes = max(len(sp.meta.classes), int(labels.max()) + 1)
    return MethodInput(
        taps=store.manifest.taps,
        num_classes=num_classes,
        final_norm=store.final_norm(),
        backbone_kind=store.manifest.backbone.get("kind", "vit"),
    )


def bank_members(method: str, ctx: PeerContext, members: int) -> list[Any]:
    """K members of ``method`` that differ only in learning rate (one bank, the sweep case)."""
    settings = {"batch_size": ctx.batch_size, **ctx.method_config.get(method, {})}
    lr = SIDE_LR.get(method, 1e-3)
    if members == 1:
        return expand(method, {**settings, "lr": lr})
    return expand(method, settings, {"lr": [lr * (1.25**k) for k in range(members)]})


class FeatcachePeer(Peer):
    """featcache's training step: ``MemberBank.train_step`` on a batch from ``open_reader`` (batch read included)."""

    def __init__(
        self, ctx: PeerContext, method: str, members: int | None = None, reader: CacheReader | None = None
    ) -> None:
        """``reader``: share another peer's reader (a resident one holds the whole split) instead of opening one."""
        super().__init__(ctx)
        self.method = method
        self.name = f"featcache-{method}" + (f"-K{members}" if members and members > 1 else "")
        store = FeatureStore.open(ctx.store)
        self.bank = MemberBank(bank_members(method, ctx, members or ctx.members), method_input(store), self.device)
        self.reader: CacheReader = reader or open_reader(
            store.split("train"),
            self.bank.required_taps,
            ctx.reader,
            ctx.batch_size,
            shuffle=True,
            device=self.device,
            drop_last=True,
            **ctx.reader_options,
        )
        self._batches = self._forever()

    def _forever(self) -> Iterator[Batch]:
        epoch = 0
        while True:
            yield from self.reader.epoch(epoch)
            epoch += 1

    def next_batch(self) -> Batch:
        return next(self._batches)

    def train_on(self, batch: Batch) -> None:
        self.bank.train_step(batch.taps, batch.labels, 0.5, 30)
        self.steps += 1

    def step(self) -> None:
        self.train_on(self.next_batch())

    def trainable_params(self) -> int:
        return self.bank.param_count() * len(self.bank)

    def flops_per_sample(self) -> int:
        """Forward FLOPs of one member for one sample (matmuls, FlopCounterMode)."""
        return self.bank.template.flops_per_sample()

    def describe(self) -> dict[str, Any]:
        return {
            **super().describe(),
            "method": self.method,
            "members": len(self.bank),
            "reader": self.reader.mode,
            "config": self.bank.members[0].method_config,
            "flops_per_sample": self.flops_per_sample(),
            "required_taps": self.bank.required_taps,
        }


# ---------------------------------------------------------------------------------------------
# Image-space peers


class ImagePeer(Peer):
    """A peer that trains on transformed images: a model, an AdamW optimizer, a loss."""

    def __init__(self, ctx: PeerContext) -> None:
        super().__init__(ctx)
        self.backbone = Backbone(ctx.preset.backbone_spec(), self.device)
        n = ctx.images if ctx.preload else max(ctx.batch_size, min(ctx.images, ctx.batch_size * 4))
        self.images = ImageBatches(
            subset(ctx.data, n), self.backbone.transform, ctx.batch_size, self.device, preload=ctx.preload
        )
        self.module: nn.Module = nn.Identity()
        self.optimizer: torch.optim.Optimizer | None = None

    def autocast(self) -> torch.autocast:
        return torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.device.type == "cuda")

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        return self.module(x)

    def step(self) -> None:
        x, y = self.images.batch(self.steps)
        self.train_batch(x, y)

    def train_batch(self, x: torch.Tensor, y: torch.Tensor) -> float:
        """One optimisation step on (x, y); returns the loss (as a tensor's float only when asked for)."""
        assert self.optimizer is not None
        with self.autocast():
            logits = self.logits(x)
        loss = F.cross_entropy(logits.float(), y)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for g in self.optimizer.param_groups for p in g["params"]], 1.0)
        self.optimizer.step()
        self.steps += 1
        return loss.detach()

    def trainable_params(self) -> int:
        return trainable(self.module)

    @torch.no_grad()
    def predict(self, x: torch.Tensor) -> torch.Tensor:
        was = self.module.training
        self.module.eval()
        with self.autocast():
            out = self.logits(x).argmax(-1)
        self.module.train(was)
        return out


class SideInLoopPeer(ImagePeer):
    """LAST (or any side network) fed by the backbone on every step: the method without a cache."""

    def __init__(self, ctx: PeerContext, method: str = "last", lr: float | None = None) -> None:
        super().__init__(ctx)
        self.name = f"{method}-in-loop"
        bb = self.backbone
        mi = MethodInput(
            taps=bb.taps.infos, num_classes=ctx.num_classes, final_norm=bb.final_norm_state(), backbone_kind=bb.kind
        )
        torch.manual_seed(0)
        self.module = methods.create(method, ctx.method_config.get(method), mi).to(self.device)
        bb.taps.select(
            [
                bb.taps.all_infos[[t.name for t in bb.taps.all_infos].index(n)].position
                for n in self.module.required_taps
            ]
        )  # run the backbone only as far as needed
        self.optimizer = torch.optim.AdamW(param_groups(list(self.module.named_parameters())), lr=lr or SIDE_LR[method])

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            taps = self.backbone.taps(x)  # frozen: nothing is kept for backward
        return self.module(taps)

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "flops_per_sample": self.module.flops_per_sample()}


class LoraPeer(ImagePeer):
    """peft LoRA (r=8, alpha=16, no dropout) on the preset's targets; the new classifier trained in full."""

    name = "lora"

    def __init__(self, ctx: PeerContext, lr: float | None = None, rank: int = 8) -> None:
        super().__init__(ctx)
        from peft import LoraConfig, get_peft_model

        model = self.backbone.model  # the same weights, no second copy
        model.reset_classifier(ctx.num_classes)
        config = LoraConfig(
            r=rank,
            lora_alpha=2 * rank,
            lora_dropout=0.0,
            target_modules=ctx.preset.lora_targets,
            modules_to_save=[ctx.preset.head],
        )
        self.module = get_peft_model(model, config).to(self.device).train()
        self.optimizer = torch.optim.AdamW(
            param_groups(list(self.module.named_parameters())), lr=lr or ctx.preset.lora_lr
        )

    def describe(self) -> dict[str, Any]:
        return {
            **super().describe(),
            "lora_targets": self.ctx.preset.lora_targets,
            "rank": 8,
            "note": self.ctx.preset.lora_note,
        }


class FullFinetunePeer(ImagePeer):
    """Every backbone parameter trained, plus a new classifier."""

    name = "full-ft"

    def __init__(self, ctx: PeerContext, lr: float | None = None) -> None:
        super().__init__(ctx)
        model = self.backbone.model
        model.reset_classifier(ctx.num_classes)
        self.module = model.to(self.device).requires_grad_(True).train()
        self.optimizer = torch.optim.AdamW(
            param_groups(list(self.module.named_parameters())), lr=lr or ctx.preset.full_ft_lr
        )


def build_peer(name: str, ctx: PeerContext) -> Peer:
    """A peer by name: ``featcache-<method>[-K<k>][@<reader>]``, ``<method>-in-loop``, ``lora`` or ``full-ft``.

    ``@ram``/``@stream``/``@gpu`` picks featcache's reader mode for this peer (default: ``ctx.reader``).
    """
    if name.startswith("featcache-"):
        base, _, reader = name.partition("@")
        parts = base.split("-")
        members = int(parts[2][1:]) if len(parts) > 2 else None
        peer_ctx = PeerContext(**{**ctx.to_dict(), "reader": reader}) if reader else ctx
        peer = FeatcachePeer(peer_ctx, parts[1], members)
        peer.name = name
        return peer
    if name.endswith("-in-loop"):
        return SideInLoopPeer(ctx, name[: -len("-in-loop")])
    if name == "lora":
        return LoraPeer(ctx)
    if name == "full-ft":
        return FullFinetunePeer(ctx)
    raise ValueError(f"unknown peer {name!r}; known: {', '.join(PEERS)}")


def store_path(root: Path, model: str) -> Path:
    return root / f"{model}.zarr"
