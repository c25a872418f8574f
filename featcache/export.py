"""A trained run as one deployable model: backbone, taps and side network in one graph from images to logits.

``export_run`` rebuilds the run's ``Predictor`` (featcache.infer: the backbone checked against the cache's
weights, its taps with the store's pooling, the cache dtype's round trip, the member's side network) and traces
``taps`` then ``logits_from_taps`` with ``torch.export`` (dynamic batch dimension), so the exported model computes
what training saw. ``onnx``: ``torch.onnx.export`` of that program (the dynamo exporter; onnxscript translates it),
the metadata in ``metadata_props`` under ``featcache`` (one JSON document, ``featcache.deployed.METADATA_KEY``);
``pt2``: ``torch.export.save`` with the same JSON as the extra file ``featcache.json`` inside the archive.

Validation, as timm's onnx_export / onnx_validate do: ``onnx.checker.check_model(full_check=True)``, then the
exported model (onnxruntime; the loaded program for pt2) against the PyTorch ``Predictor`` on real images of the
run's data; a max |logit difference| above the tolerance is refused. Everything is written to a temporary file
beside ``out`` and renamed only once it passed: nothing half-written is ever left at ``out``.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import warnings
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
from torch import nn
from torchvision import transforms as T

from featcache import __version__
from featcache.checkpoint import Checkpoint, load_checkpoint, safe_member_name
from featcache.data import DataSource, Subset, open_source, stratified_subset
from featcache.deployed import METADATA_KEY, preprocess
from featcache.errors import CheckpointError, DataError, ExportError, FeatcacheError, MissingDependencyError
from featcache.infer import Predictor, load_predictor
from featcache.options import ExportOptions
from featcache.progress import say

PT2_EXTRA_FILE = f"{METADATA_KEY}.json"  # the metadata inside a .pt2 archive (torch.export.load(extra_files=...))
INPUT_NAME, OUTPUT_NAME = "images", "logits"


class ExportedGraph(nn.Module):
    """images (N, 3, H, W) -> logits: the predictor's taps, the cache dtype's round trip and the side network, as
    ``Predictor.forward`` computes them on the CPU (float32; no inference mode, which tracing does not take)."""

    def __init__(self, predictor: Predictor) -> None:
        super().__init__()
        self.predictor = predictor

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.predictor.logits_from_taps(self.predictor.taps(images))


@dataclass
class ExportReport:
    """What ``export_run`` wrote and how the exported model compared with the PyTorch path."""

    path: Path
    format: str
    member: str
    bytes: int
    validation: dict[str, Any]
    metadata: dict[str, Any]

    def to_dict(self) -> dict[str, Any]:
        return {
            "path": str(self.path),
            "format": self.format,
            "member": self.member,
            "bytes": self.bytes,
            "validation": self.validation,
        }


def export_run(
    run: str | Path, out: str | Path, options: ExportOptions | None = None, **overrides: Any
) -> ExportReport:
    """Export member ``options.member`` (default: the best) of ``run`` to ``out`` as ONNX or a torch.export program;
    refuses (``ExportError``, nothing written) a model that does not export or differs from the PyTorch path by more
    than ``options.tolerance``. ``overrides`` replace fields of ``options``."""
    opts = ExportOptions(**{**(options or ExportOptions()).to_dict(), **overrides})
    out = Path(out)
    if out.is_dir() or (out.exists() and not opts.overwrite):
        raise ExportError(f"--out {out} already exists; pass --overwrite to replace it, or choose another file")
    if opts.format == "onnx":
        _require_onnx()
    ckpt = load_checkpoint(_member_path(Path(run), opts.member))
    predictor = load_predictor(ckpt, "cpu", opts.weights)
    if predictor.autocast.dtype_on(torch.device("cpu")) is not None:
        raise ExportError(
            f"run {run}: its store was made with {predictor.autocast.dtype_on(torch.device('cpu'))} autocast on "
            "the CPU, which an exported float32 graph does not reproduce; re-extract the store with this featcache"
        )
    images = validation_images(ckpt, predictor, opts)
    metadata = export_metadata(Path(run), ckpt, predictor)
    label = f"{predictor.backbone.spec.model} + {ckpt.config['method']} member {ckpt.config['name']!r}"
    tmp = out.parent / f".{out.stem}.tmp{os.getpid()}{out.suffix}"  # torch.export.save wants .pt2
    made = [p for p in [out.parent, *out.parent.parents] if not p.exists()]  # removed again on failure
    out.parent.mkdir(parents=True, exist_ok=True)
    write = _write_onnx if opts.format == "onnx" else _write_pt2
    try:
        with _quiet_exporters():
            program = trace(predictor, images[:1].expand(2, -1, -1, -1), label)  # batch 1 would be specialised
            validation = write(ExportJob(program, predictor, images, tmp, metadata, opts, label))
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
        for folder in made if not out.exists() else []:
            with contextlib.suppress(OSError):
                folder.rmdir()
    say(
        f"exported {label} to {out} ({opts.format}, {out.stat().st_size / 1e6:.1f} MB); max |logit diff| "
        f"{validation['max_abs_diff']:.2e} on {validation['images']} images (tolerance {opts.tolerance:g})",
        quiet=not opts.progress,
    )
    return ExportReport(out, opts.format, str(ckpt.config["name"]), out.stat().st_size, validation, metadata)


@contextlib.contextmanager
def _quiet_exporters() -> Iterator[None]:
    """torch.export's and onnxscript's progress logs and tracer warnings off: the command prints its own summary."""
    loggers = [logging.getLogger(n) for n in ("onnxscript", "onnx_ir", "torch.onnx", "torch.export", "torch._export")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def _require_onnx() -> None:
    try:
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401
        import onnxscript  # noqa: F401
    except ImportError as err:
        raise MissingDependencyError(
            f"featcache export --format onnx needs {err.name}: pip install 'featcache[onnx]' (or --format pt2)"
        ) from None


def _member_path(run: Path, member: str | None) -> Path:
    """The checkpoint to export: the run's best member, or ``member`` of its sweep."""
    if member is None:
        return run
    if not (run / "members").is_dir():
        raise CheckpointError(f"--member {member}: {run} is not a run directory (no members/); pass the run directory")
    path = run / "members" / safe_member_name(member)
    if not path.is_dir():
        names = sorted(p.name for p in (run / "members").iterdir() if p.is_dir())
        raise CheckpointError(f"--member {member}: run {run} has no such member; its members: {', '.join(names)}")
    return path


# ---------------------------------------------------------------------------------------------
# Metadata


def manifest_sha256(manifest: dict[str, Any]) -> str:
    """sha256 of the store manifest as canonical JSON (sorted keys): names the store a model was trained from."""
    return hashlib.sha256(json.dumps(manifest, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def describe_transform(transform: Any, model: str) -> dict[str, Any]:
    """The eval transform as data (``featcache.deployed.preprocess`` applies it): resize (an int: the shorter side;
    [h, w]: exact), interpolation, centre crop [h, w], mean and std. Refuses a step it cannot describe."""
    steps = list(getattr(transform, "transforms", [transform]))
    kinds = [type(s).__name__ for s in steps]
    if kinds != ["Resize", "CenterCrop", "MaybeToTensor", "Normalize"] and kinds != [
        "Resize",
        "CenterCrop",
        "ToTensor",
        "Normalize",
    ]:
        raise ExportError(
            f"model {model}: its eval transform ({', '.join(kinds)}) is not resize, centre crop, to tensor, normalise, "
            "which is what an exported model's metadata describes; export supports timm's center and squash crops"
        )
    resize, crop, _, norm = steps
    if resize.max_size is not None:
        raise ExportError(f"model {model}: its eval transform's Resize has max_size={resize.max_size}, not supported")
    size = resize.size
    size = int(size[0]) if isinstance(size, (list, tuple)) and len(size) == 1 else size
    return {
        "resize": [int(v) for v in size] if isinstance(size, (list, tuple)) else int(size),
        "interpolation": T.InterpolationMode(resize.interpolation).value,
        "crop": [int(v) for v in crop.size],
        "mean": [float(v) for v in torch.as_tensor(norm.mean).flatten()],
        "std": [float(v) for v in torch.as_tensor(norm.std).flatten()],
    }


def export_metadata(run: Path, ckpt: Checkpoint, predictor: Predictor) -> dict[str, Any]:
    """The JSON record stored with the model: how to prepare inputs and read outputs, and where it came from."""
    backbone = predictor.backbone
    data_config = {k: list(v) if isinstance(v, tuple) else v for k, v in backbone.data_config.items()}
    selection = None
    for place in (run / "best.json", ckpt.path.parent.parent.parent / "best.json"):
        if place.is_file():
            selection = json.loads(place.read_text())
            break
    return {
        "featcache_version": __version__,
        "input": {"name": INPUT_NAME, "shape": ["N", *data_config["input_size"]], "dtype": "float32"},
        "output": {"name": OUTPUT_NAME, "shape": ["N", len(predictor.classes)], "dtype": "float32"},
        "input_size": data_config["input_size"],
        "mean": data_config["mean"],
        "std": data_config["std"],
        "interpolation": data_config["interpolation"],
        "crop_pct": data_config.get("crop_pct"),
        "crop_mode": data_config.get("crop_mode", "center"),
        "preprocess": describe_transform(backbone.transform, backbone.spec.model),
        "classes": list(predictor.classes),
        "model": backbone.spec.model,
        "backbone_weights": {k: v for k, v in backbone.weights.items() if k != "path"},
        "method": ckpt.config["method"],
        "member": ckpt.config["name"],
        "cache_dtype": predictor.cache_dtype,
        "taps": list(ckpt.network.required_taps),
        "store": {
            "url": ckpt.config["store"].get("url"),
            "split": ckpt.config["store"].get("split"),
            "manifest_sha256": manifest_sha256(ckpt.manifest),
        },
        "selection": selection,
    }


# ---------------------------------------------------------------------------------------------
# Validation images


def validation_images(ckpt: Checkpoint, predictor: Predictor, opts: ExportOptions) -> torch.Tensor:
    """``opts.images`` real images (stratified, fixed), through the eval transform: from ``opts.data``, else from
    the data of the split the run trained on, as the store records it."""
    source = open_source(opts.data) if opts.data else _trained_split_source(ckpt)
    if len(source) == 0:
        raise DataError(f"the validation data {source.spec} holds no images")
    picked: DataSource = Subset(source, stratified_subset(source.labels(), opts.images))
    return torch.stack([predictor.transform(picked[i].image) for i in range(len(picked))])


def _trained_split_source(ckpt: Checkpoint) -> DataSource:
    from featcache.store.feature_store import FeatureStore

    url, split = ckpt.config["store"].get("url"), ckpt.config["store"].get("split")
    try:
        spec = FeatureStore.open(url).split(split).meta.data
        return open_source(spec)
    except (FeatcacheError, OSError, KeyError, TypeError) as err:
        raise DataError(
            f"export validates on real images, and the images of split {split!r} of {url} are not at hand "
            f"({str(err).splitlines()[0][:160] if str(err) else type(err).__name__}); pass --data SPEC"
        ) from None


# ---------------------------------------------------------------------------------------------
# Tracing and writing


_OPERATOR = (  # how torch's exporters name the operator they could not translate, the fullest form first
    re.compile(r"target=torch\.ops\.([A-Za-z0-9_]+\.[A-Za-z0-9_]+\.[A-Za-z0-9_]+)"),
    re.compile(r"No ONNX function found for <OpOverload\(op='([^']+)', overload='([^']+)'"),
    re.compile(r"\b((?:aten|prims)[.:]{1,2}[A-Za-z0-9_]+)"),
)
_FRAME = re.compile(r'File "([^"]+)", line (\d+), in (\w+)')


def describe_failure(err: BaseException, program: torch.export.ExportedProgram | None = None) -> str:
    """What an export failure names: the operator (``aten.xxx``) and, from the traced ``program``, the module and
    source line that call it; else the error's first line."""
    chain: list[BaseException] = []
    e: BaseException | None = err
    while e is not None and len(chain) < 8:
        chain.append(e)
        e = e.__cause__ or e.__context__
    text = "\n".join(f"{type(e).__name__}: {e}" for e in chain)
    for pattern in _OPERATOR:
        found = pattern.search(text)
        if found:
            op = ".".join(found.groups()).replace("::", ".")
            where = _caller(program, op) if program is not None else None
            return f"operator {op.removesuffix('.default')}{f' in {where}' if where else ''} has no translation to this format"
    first = next((line.strip() for line in str(err).splitlines() if line.strip()), type(err).__name__)
    return f"{type(err).__name__}: {first[:300]}"


def _caller(program: torch.export.ExportedProgram, op: str) -> str | None:
    """'module path (Type), file:line in function' of the call of ``op`` in the traced program: the node with that
    exact overload, else one whose operator decomposes to it (``aten.special_zeta`` for ``prims.zeta``)."""
    nodes = [n for n in program.graph.nodes if n.op == "call_function"]
    base = op.split(".")[1] if op.count(".") >= 1 else op
    node = next((n for n in nodes if str(n.target) == op), None) or next(
        (n for n in nodes if any(t == base or t.endswith(f"_{base}") for t in str(n.target).split(".")[1:2])), None
    )
    if node is None:
        return None
    parts = []
    stack = list((node.meta.get("nn_module_stack") or {}).values())
    if len(stack) > 1:  # the innermost module below the exported graph itself
        path, kind = stack[-1]
        kind_name = getattr(kind, "__name__", str(kind).rsplit(".", 1)[-1].strip("'>"))
        parts.append(f"module {path.removeprefix('L__self__').strip('._')} ({kind_name})")
    frames = _FRAME.findall(node.meta.get("stack_trace") or "")
    if len(stack) <= 1 and frames and frames[-1][2] == "forward" and frames[-1][0].endswith("export.py"):
        parts.append(
            "the cache dtype's round trip (featcache.store.codecs.round_trip)"
        )  # the only code outside modules
    elif frames:
        file, line, function = frames[-1]
        parts.append(
            f"{'featcache/' + file.split('/featcache/')[-1] if '/featcache/' in file else file}:{line} in {function}"
        )
    return ", ".join(parts) or None


def trace(predictor: Predictor, example: torch.Tensor, label: str) -> torch.export.ExportedProgram:
    """``torch.export`` of the exported graph with a dynamic batch dimension."""
    graph = ExportedGraph(predictor).eval()
    batch = torch.export.Dim("batch", min=1)
    try:
        with torch.no_grad():
            return torch.export.export(graph, (example,), dynamic_shapes=({0: batch},), strict=False)
    except Exception as err:
        raise ExportError(f"{label} cannot be exported: {describe_failure(err)}") from None


@dataclass(frozen=True)
class ExportJob:
    """What a format's writer needs: the traced program, the PyTorch path to validate against, where to write."""

    program: torch.export.ExportedProgram
    predictor: Predictor
    images: torch.Tensor
    tmp: Path
    metadata: dict[str, Any]
    opts: ExportOptions
    label: str


def _unpacked(job: ExportJob) -> tuple[Any, ...]:
    """The job's fields in order (not dataclasses.astuple, which deep-copies the program and tensors)."""
    return tuple(getattr(job, f.name) for f in fields(job))


def _write_onnx(job: ExportJob) -> dict[str, Any]:
    program, predictor, images, tmp, metadata, opts, label = _unpacked(job)
    import onnx

    from featcache.deployed import OnnxClassifier

    try:
        onnx_program = torch.onnx.export(
            program,
            dynamo=True,
            opset_version=opts.opset,
            input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME],
            optimize=opts.optimize,
            report=False,
            verbose=False,
        )
        onnx_program.save(str(tmp), external_data=False)
    except Exception as err:
        raise ExportError(f"{label} cannot be exported to ONNX: {describe_failure(err, program)}") from None
    model = onnx.load(str(tmp))
    _name_batch_dimension(model)
    _set_metadata(model, metadata)
    onnx.save(model, str(tmp))
    try:
        onnx.checker.check_model(str(tmp), full_check=True)
    except Exception as err:
        raise ExportError(f"{label}: the ONNX graph fails onnx.checker ({str(err).splitlines()[0][:200]})") from None
    threads = torch.get_num_threads()
    validation = compare(predictor, images, lambda x: OnnxClassifier(tmp, threads=threads)(x), opts, label)
    _set_metadata(model, {**metadata, "validation": validation})
    onnx.save(model, str(tmp))
    return validation


def _name_batch_dimension(model: Any) -> None:
    """The exporter's symbol for the dynamic batch dimension (``s34``, say) renamed ``N`` everywhere in the graph."""
    symbol = model.graph.input[0].type.tensor_type.shape.dim[0].dim_param
    if not symbol:
        return
    for value in [*model.graph.input, *model.graph.output, *model.graph.value_info]:
        for dim in value.type.tensor_type.shape.dim:
            if dim.dim_param == symbol:
                dim.dim_param = "N"


def _set_metadata(model: Any, metadata: dict[str, Any]) -> None:
    del model.metadata_props[:]
    entry = model.metadata_props.add()
    entry.key, entry.value = METADATA_KEY, json.dumps(metadata)


def _write_pt2(job: ExportJob) -> dict[str, Any]:
    program, predictor, images, tmp, metadata, opts, label = _unpacked(job)
    torch.export.save(program, str(tmp), extra_files={PT2_EXTRA_FILE: json.dumps(metadata)})
    loaded = torch.export.load(str(tmp)).module()

    def run(x: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return loaded(torch.from_numpy(x)).numpy()

    validation = compare(predictor, images, run, opts, label)
    torch.export.save(
        program, str(tmp), extra_files={PT2_EXTRA_FILE: json.dumps({**metadata, "validation": validation})}
    )
    return validation


def compare(
    predictor: Predictor, images: torch.Tensor, exported: Any, opts: ExportOptions, label: str
) -> dict[str, Any]:
    """The exported model's logits against the PyTorch path on ``images``: refuses a max |diff| above the tolerance."""
    want = predictor(images).numpy()
    got = exported(images.numpy())
    diff = float(np.abs(got - want).max())
    agree = float(np.mean(got.argmax(-1) == want.argmax(-1)))
    if not np.isfinite(diff) or diff > opts.tolerance:
        raise ExportError(
            f"{label}: the exported model's logits differ from featcache's by up to {diff:.3g} on "
            f"{len(images)} images (tolerance {opts.tolerance:g}); nothing written (raise --tolerance to accept it)"
        )
    return {"images": len(images), "max_abs_diff": diff, "top1_agreement": agree, "tolerance": opts.tolerance}


__all__ = ["ExportReport", "ExportedGraph", "describe_transform", "export_run", "manifest_sha256", "preprocess"]
