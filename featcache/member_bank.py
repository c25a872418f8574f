"""A member bank: K same-shaped side networks trained as one stacked module.

``torch.func.stack_module_state`` stacks the K members' parameters into (K, ...) tensors and
``vmap(functional_call)`` runs all members on the same batch in shared kernels. Each member keeps its
own AdamW state, learning-rate schedule (warmup + cosine), weight decay, label smoothing, gradient
clipping and its own fate: a member whose loss or gradients stop being finite is stopped (its
updates are masked from then on) and reported; the others go on.

On CPU, torch has no vmap batching rule for its fused attention kernels (vmap loops over members while
holding every member's activations; docs/training.md): there, methods that use attention run member by
member (forward and backward of one, then the next), with the same results and one member's activation
memory. The optimizer still updates all K stacked members at once.

Dropout (LST): ``functional_call`` runs the template module in its own mode, so ``train_step`` puts the
template in train mode and ``evaluate`` in eval mode. Under vmap (``randomness="different"``) each member
draws its own masks; the member loop draws them one member after the other from the global generator,
which the trainer seeds per epoch.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch.func import functional_call, stack_module_state, vmap
from torch.nn.attention import SDPBackend, sdpa_kernel

from featcache import methods
from featcache.methods.base import MethodInput

from .sweep import SweepMember

BETAS = (0.9, 0.999)
Target = tuple[torch.Tensor, "torch.Tensor | None", float]  # (labels, mixed-in labels or None, weight of labels)
EPS = 1e-8


class MemberBank:
    """K members of one method and architecture; see the module docstring."""

    def __init__(self, members: list[SweepMember], method_input: MethodInput, device: torch.device) -> None:
        if len({m.arch_key() for m in members}) != 1:
            raise ValueError("a bank holds members of one method and architecture")
        self.members = members
        self.device = device
        modules = []
        for m in members:
            torch.manual_seed(m.train.seed)
            modules.append(methods.create(m.method, m.method_config, method_input))
        self.template = modules[0].to(device)
        self.required_taps = list(self.template.required_taps)
        params, buffers = stack_module_state([mod.to(device) for mod in modules])
        self.params: dict[str, torch.Tensor] = {k: v.detach().clone().requires_grad_(True) for k, v in params.items()}
        self.buffers: dict[str, torch.Tensor] = {k: v.detach().clone() for k, v in buffers.items()}
        # weight decay on weight matrices only: not on biases, norms, gates, embeddings of size (d,)
        self.decay = {k: v.ndim >= 3 for k, v in self.params.items()}  # (K, out, in) and larger
        self.exp_avg = {k: torch.zeros_like(v) for k, v in self.params.items()}
        self.exp_avg_sq = {k: torch.zeros_like(v) for k, v in self.params.items()}
        self.step = 0
        col = lambda key: torch.tensor([float(getattr(m.train, key)) for m in members], device=device)  # noqa: E731
        self.lr, self.wd, self.clip = col("lr"), col("weight_decay"), col("clip_grad")
        self.smoothing, self.warmup = col("label_smoothing"), col("warmup_epochs")
        self.augment = members[0].train.augment()  # the feature augmentation every member of the bank shares
        self._param_count = sum(v[0].numel() for v in self.params.values())
        self.alive = torch.ones(len(members), dtype=torch.bool, device=device)
        self.diverged_at: list[str | None] = [None] * len(members)
        self._forward = vmap(self._member_forward, in_dims=(0, 0, None), randomness="different")
        self.member_loop = device.type != "cuda" and self.template.uses_attention
        if device.type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True

    def __len__(self) -> int:
        return len(self.members)

    def _member_forward(
        self, params: dict[str, torch.Tensor], buffers: dict[str, torch.Tensor], taps: dict[str, torch.Tensor]
    ) -> torch.Tensor:
        return functional_call(self.template, (params, buffers), (taps,))

    def member_logits(self, k: int, taps: dict[str, torch.Tensor]) -> torch.Tensor:
        """(B, classes) logits of member k alone, on views of the stacked parameters."""
        params = {name: p[k] for name, p in self.params.items()}
        buffers = {name: b[k] for name, b in self.buffers.items()}
        return functional_call(self.template, (params, buffers), (taps,))

    def forward(self, taps: dict[str, torch.Tensor]) -> torch.Tensor:
        """(K, B, classes) logits of every member on the same batch."""
        taps = {k: taps[k] for k in self.required_taps}
        if self.member_loop:
            return torch.stack([self.member_logits(k, taps) for k in range(len(self))])
        if self.device.type != "cuda":
            return self._forward(self.params, self.buffers, taps)
        # Under vmap, CUDA's fused attention fails in backward ("LSE is not correctly aligned") and the
        # math kernel's softmax backward refuses bf16 autocast; so members run in float32 with TF32 tensor cores.
        with sdpa_kernel(SDPBackend.MATH):
            return self._forward(self.params, self.buffers, taps)

    def param_count(self) -> int:
        """Trainable parameters of one member."""
        return self._param_count

    def stacked_param_count(self) -> int:
        """Trainable parameters the bank holds: one member's times the members in it."""
        return sum(v.numel() for v in self.params.values())

    def keep(self, slots: list[int]) -> None:
        """Keep only members ``slots`` (in that order): their stacked parameters, buffers, AdamW moments and
        settings; the others leave the bank (successive halving), so a step costs what the kept members cost.
        The step counter stays: every member's schedule and bias correction go on as in the full bank."""
        idx = torch.as_tensor(slots, dtype=torch.long, device=self.device)
        with torch.no_grad():
            self.params = {k: v.detach()[idx].clone().requires_grad_(True) for k, v in self.params.items()}
            self.buffers = {k: v[idx].clone() for k, v in self.buffers.items()}
            self.exp_avg = {k: v[idx].clone() for k, v in self.exp_avg.items()}
            self.exp_avg_sq = {k: v[idx].clone() for k, v in self.exp_avg_sq.items()}
        self.lr, self.wd, self.clip = self.lr[idx], self.wd[idx], self.clip[idx]
        self.smoothing, self.warmup, self.alive = self.smoothing[idx], self.warmup[idx], self.alive[idx]
        self.diverged_at = [self.diverged_at[k] for k in slots]
        self.members = [self.members[k] for k in slots]

    def losses(self, logits: torch.Tensor, labels: torch.Tensor, smoothing: torch.Tensor | None = None) -> torch.Tensor:
        """(K,) mean cross-entropy per member, each with its own label smoothing."""
        logp = F.log_softmax(logits.float(), dim=-1)  # (K, B, classes)
        nll = -logp.gather(-1, labels.view(1, -1, 1).expand(logp.shape[0], -1, 1)).squeeze(-1)  # (K, B)
        smooth = -logp.mean(dim=-1)  # (K, B)
        eps = (self.smoothing if smoothing is None else smoothing).view(-1, 1)
        return ((1 - eps) * nll + eps * smooth).mean(dim=1)

    def mixed_losses(self, logits: torch.Tensor, target: Target, smoothing: torch.Tensor | None = None) -> torch.Tensor:
        """(K,) losses against ``lam * labels + (1 - lam) * labels_b`` (feature mixup/cutmix; cross-entropy is
        linear in its target, so this is the soft-target loss)."""
        labels, labels_b, lam = target
        if labels_b is None:
            return self.losses(logits, labels, smoothing)
        return lam * self.losses(logits, labels, smoothing) + (1 - lam) * self.losses(logits, labels_b, smoothing)

    def _forward_backward(self, taps: dict[str, torch.Tensor], target: Target) -> tuple[torch.Tensor, torch.Tensor]:
        """(K, B, classes) logits and (K,) losses, gradients accumulated into the stacked parameters."""
        if not self.member_loop:
            logits = self.forward(taps)
            losses = self.mixed_losses(logits, target)
            losses.sum().backward()  # members are independent: d(sum)/d(member k) touches member k alone
            return logits, losses
        logits, losses = [], []
        for k in range(len(self)):  # one member's activations alive at a time
            lk = self.member_logits(k, taps)  # (B, classes)
            loss = self.mixed_losses(lk[None], target, self.smoothing[k : k + 1])  # (1,)
            loss.sum().backward()
            logits.append(lk.detach())
            losses.append(loss.detach())
        return torch.stack(logits), torch.cat(losses)

    def lr_factor(self, progress: float, total_epochs: int) -> torch.Tensor:
        """(K,) schedule factor at ``progress`` epochs: linear warmup, then cosine decay to 0."""
        t = torch.full_like(self.warmup, progress)
        warm = torch.clamp(self.warmup, max=total_epochs * 0.5)
        cos_t = ((t - warm) / torch.clamp(total_epochs - warm, min=1e-8)).clamp(0, 1)
        cosine = 0.5 * (1 + torch.cos(math.pi * cos_t))
        ramp = torch.where(warm > 0, ((t + 1e-3) / torch.clamp(warm, min=1e-8)).clamp(max=1.0), torch.ones_like(t))
        return torch.where(t < warm, ramp, cosine)

    def lr_at(self, progress: float, total_epochs: int) -> torch.Tensor:
        """(K,) learning rate of each member at ``progress`` epochs (its lr times the schedule factor)."""
        return self.lr * self.lr_factor(progress, total_epochs)

    def train_step(
        self,
        taps: dict[str, torch.Tensor],
        labels: torch.Tensor,
        progress: float,
        total_epochs: int,
        where: str = "",
        labels_b: torch.Tensor | None = None,
        lam: float = 1.0,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One AdamW step for every live member; returns per-member (loss, correct count) on this batch.

        ``labels_b`` and ``lam``: a mixed batch (featcache.augment) whose target is
        ``lam * labels + (1 - lam) * labels_b``; correct counts are against ``labels``."""
        for p in self.params.values():
            p.grad = None
        self.template.train()  # dropout on (functional_call runs the template's modules in its mode)
        logits, losses = self._forward_backward(taps, (labels, labels_b, lam))
        with torch.no_grad():
            grads = {k: p.grad for k, p in self.params.items()}
            sq = sum((g.float().reshape(len(self), -1) ** 2).sum(dim=1) for g in grads.values())
            norm = torch.sqrt(sq)  # (K,)
            finite = torch.isfinite(losses) & torch.isfinite(norm)
            newly_dead = self.alive & ~finite
            if bool(newly_dead.any()):
                for k in torch.nonzero(newly_dead).flatten().tolist():
                    self.diverged_at[k] = where or f"step {self.step}"
                self.alive &= finite
            scale = torch.where(self.clip > 0, torch.clamp(self.clip / (norm + 1e-6), max=1.0), torch.ones_like(norm))
            scale = torch.where(self.alive, scale, torch.zeros_like(scale))
            scale = torch.nan_to_num(scale, nan=0.0, posinf=0.0)
            lr_now = self.lr_at(progress, total_epochs) * self.alive
            self._adamw(grads, scale, lr_now)
            correct = (logits.argmax(-1) == labels.view(1, -1)).sum(dim=1)
        return losses.detach(), correct

    def _adamw(self, grads: dict[str, torch.Tensor], scale: torch.Tensor, lr_now: torch.Tensor) -> None:
        """Decoupled-weight-decay Adam on the stacked tensors with per-member lr, decay and grad scale."""
        self.step += 1
        b1, b2 = BETAS
        bc1, bc2 = 1 - b1**self.step, 1 - b2**self.step
        for name, p in self.params.items():
            shape = (len(self),) + (1,) * (p.ndim - 1)
            g = torch.nan_to_num(grads[name]) * scale.view(shape)
            m, v = self.exp_avg[name], self.exp_avg_sq[name]
            m.mul_(b1).add_(g, alpha=1 - b1)
            v.mul_(b2).addcmul_(g, g, value=1 - b2)
            lr = lr_now.view(shape)
            if self.decay[name]:
                p.mul_(1 - lr * self.wd.view(shape))
            p.sub_(lr / bc1 * m / ((v / bc2).sqrt() + EPS))

    @torch.no_grad()
    def evaluate(
        self, taps: dict[str, torch.Tensor], labels: torch.Tensor, views: int = 1
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per-member (summed loss, correct count) and the (K, B) predictions on one batch (eval mode: no dropout).

        ``views`` > 1: the taps hold V views of each sample, (B * V, T, C); a sample's logits are the mean of
        its views' logits (test-time augmentation)."""
        self.template.eval()
        logits = self.forward(taps)  # (K, B * V, classes)
        if views > 1:
            logits = logits.reshape(logits.shape[0], -1, views, logits.shape[-1]).mean(dim=2)  # (K, B, classes)
        logp = F.log_softmax(logits.float(), dim=-1)
        nll = -logp.gather(-1, labels.view(1, -1, 1).expand(logp.shape[0], -1, 1)).squeeze(-1)
        pred = logits.argmax(-1)
        return nll.sum(dim=1), (pred == labels.view(1, -1)).sum(dim=1), pred

    def member_state(self, k: int) -> dict[str, torch.Tensor]:
        """Member k's own state dict (parameters and buffers), loadable into ``methods.create(...)``."""
        out = {name: p[k].detach().cpu().contiguous() for name, p in self.params.items()}
        out.update({name: b[k].detach().cpu().contiguous() for name, b in self.buffers.items()})
        return out

    def state(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """(tensors, json) of the whole bank for resuming: parameters, optimizer moments, alive mask."""
        tensors = {}
        for prefix, group in (
            ("param", self.params),
            ("buffer", self.buffers),
            ("exp_avg", self.exp_avg),
            ("exp_avg_sq", self.exp_avg_sq),
        ):
            tensors.update({f"{prefix}/{k}": v.detach().cpu().contiguous() for k, v in group.items()})
        tensors["alive"] = self.alive.cpu().to(torch.uint8)
        return tensors, {"step": self.step, "diverged_at": self.diverged_at, "members": [m.name for m in self.members]}

    def load_state(self, tensors: dict[str, torch.Tensor], info: dict[str, Any]) -> None:
        """Restore ``state()``; a bank saved after a halving rung holds fewer members: the others leave first."""
        names = [m.name for m in self.members]
        saved = list(info.get("members", names))
        if saved != names:
            self.keep([names.index(n) for n in saved])  # a name not in the bank: ValueError (the caller reports it)
        with torch.no_grad():
            for prefix, group in (
                ("param", self.params),
                ("buffer", self.buffers),
                ("exp_avg", self.exp_avg),
                ("exp_avg_sq", self.exp_avg_sq),
            ):
                for k, v in group.items():
                    v.copy_(tensors[f"{prefix}/{k}"].to(self.device))
        self.alive = tensors["alive"].to(self.device).bool()
        self.step = int(info["step"])
        self.diverged_at = list(info["diverged_at"])
