"""An exported model (``featcache export``) run with onnxruntime alone: no torch, no timm, no run directory.

The graph maps images (N, 3, H, W) float32 to logits (N, classes); its ONNX metadata (key ``featcache``, one JSON
document, ``METADATA_KEY``) says how to prepare the images (``preprocess``: the eval transform the cache was made
with, as resize, centre crop and normalisation) and how to read the logits (``classes``). ``preprocess`` here is
that transform in numpy and PIL, step for step as torchvision does it on a PIL image (same resize sizes, same crop
offsets, same float32 arithmetic), so that ``featcache predict model.onnx`` sees the inputs ``featcache predict
RUNDIR`` sees. The prediction rows and the result (``prediction_result``) are shared with the PyTorch path.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from featcache.data import DataSource, Subset, open_source, stratified_subset
from featcache.errors import CheckpointError, DataError, MissingDependencyError, UsageError
from featcache.options import PredictOptions
from featcache.progress import bar, say

METADATA_KEY = "featcache"  # the ONNX metadata_props key (and the pt2 extra file's stem) of the JSON record
PIL_FILTERS = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
    "box": Image.Resampling.BOX,
    "hamming": Image.Resampling.HAMMING,
}


def resized_size(width: int, height: int, resize: int | list[int]) -> tuple[int, int]:
    """(width, height) after torchvision's ``Resize(resize)`` of a PIL image: an int sets the shorter side (the longer
    one scaled and truncated), a pair [h, w] the exact size."""
    if isinstance(resize, list):
        return int(resize[1]), int(resize[0])
    if width <= height:
        return resize, int(resize * height / width)
    return int(resize * width / height), resize


def preprocess(image: Image.Image, record: dict[str, Any]) -> np.ndarray:
    """One RGB image -> (3, H, W) float32: resize, centre crop (padding with zeros where the image is smaller, as
    torchvision does), /255, normalise with the mean and std; ``record`` is the metadata's ``preprocess``."""
    image = image.convert("RGB")
    size = resized_size(*image.size, record["resize"])
    if size != image.size:
        image = image.resize(size, PIL_FILTERS[record["interpolation"]])
    ch, cw = record["crop"]
    w, h = image.size
    if cw > w or ch > h:  # torchvision pads (zeros, both sides) before cropping
        left, top = (cw - w) // 2 if cw > w else 0, (ch - h) // 2 if ch > h else 0
        padded = Image.new("RGB", (max(w, cw), max(h, ch)))
        padded.paste(image, (left, top))
        image, (w, h) = padded, padded.size
    top, left = int(round((h - ch) / 2.0)), int(round((w - cw) / 2.0))
    image = image.crop((left, top, left + cw, top + ch))
    x = np.asarray(image, dtype=np.float32) / np.float32(255)
    mean, std = np.asarray(record["mean"], np.float32), np.asarray(record["std"], np.float32)
    return ((x - mean) / std).transpose(2, 0, 1)


class OnnxClassifier:
    """An exported ONNX model in an onnxruntime session: ``classifier(batch) -> logits``, with its ``record``
    (the featcache metadata), ``classes`` and ``preprocess``."""

    def __init__(self, path: str | Path, threads: int | None = None, providers: list[str] | None = None) -> None:
        try:
            import onnxruntime as ort
        except ImportError:
            raise MissingDependencyError(
                "running an exported .onnx model needs onnxruntime: pip install 'featcache[onnx]'"
            ) from None
        options = ort.SessionOptions()
        # idle worker threads sleep instead of spinning, as featcache's OMP_WAIT_POLICY=PASSIVE has torch's do
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        if threads is not None:
            options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
        try:
            self.session = ort.InferenceSession(str(path), options, providers=providers or ["CPUExecutionProvider"])
        except Exception as err:  # onnxruntime raises its own types for unreadable or invalid files
            raise CheckpointError(
                f"{path} is not a model onnxruntime can load ({str(err).splitlines()[0][:200]})"
            ) from None
        meta = self.session.get_modelmeta().custom_metadata_map
        if METADATA_KEY not in meta:
            raise CheckpointError(
                f"{path} holds no featcache metadata (key {METADATA_KEY!r}): export it with featcache export"
            )
        self.record: dict[str, Any] = json.loads(meta[METADATA_KEY])
        self.classes: list[str] = list(self.record.get("classes", []))
        self.input_name = self.session.get_inputs()[0].name

    def preprocess(self, image: Image.Image) -> np.ndarray:
        return preprocess(image, self.record["preprocess"])

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        """(N, 3, H, W) float32 -> logits (N, classes) float32."""
        return self.session.run(None, {self.input_name: np.ascontiguousarray(batch, dtype=np.float32)})[0]


def softmax(logits: np.ndarray) -> np.ndarray:
    e = np.exp(logits - logits.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def prediction_result(
    ids: list[str], pred: np.ndarray, prob: np.ndarray, label: np.ndarray, classes: list[str]
) -> dict[str, Any]:
    """``predict``'s result: {num_images, [accuracy], predictions: [{id, label, pred, pred_class, prob}]}."""
    rows = [
        {
            "id": ids[i],
            "label": int(label[i]),
            "pred": int(pred[i]),
            "pred_class": classes[pred[i]] if pred[i] < len(classes) else str(pred[i]),
            "prob": float(prob[i]),
        }
        for i in range(len(pred))
    ]
    result: dict[str, Any] = {"num_images": len(rows)}
    known = label >= 0
    if known.any():
        result["accuracy"] = float(np.mean(pred[known] == label[known]))
    result["predictions"] = rows
    return result


def write_predictions_csv(path: str | Path, rows: list[dict[str, Any]]) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["id", "label", "pred", "pred_class", "prob"])
        writer.writeheader()
        writer.writerows(rows)


def check_classes(source: DataSource, classes: list[str]) -> None:
    if source.classes and classes and list(source.classes) != list(classes):
        raise DataError(
            f"the data's classes {source.classes[:5]}... differ from the checkpoint's {classes[:5]}...; "
            "predict needs the same class folders as training (or an unlabelled flat folder)"
        )


def _providers(device: str) -> list[str]:
    if device in ("auto", "cpu"):
        return ["CPUExecutionProvider"]
    if device.startswith("cuda"):
        import onnxruntime as ort

        if "CUDAExecutionProvider" not in ort.get_available_providers():
            raise UsageError(f"--device {device}: this onnxruntime has no CUDA provider; use --device cpu")
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    raise UsageError(f"--device must be auto, cpu or cuda[:N], got {device!r}")


def predict_onnx(
    model: str | Path, data: str | DataSource, options: PredictOptions | None = None, **overrides: Any
) -> dict[str, Any]:
    """``predict`` for an exported .onnx model: the same result and CSV as for a run directory, with onnxruntime."""
    opts = PredictOptions(**{**(options or PredictOptions()).to_dict(), **overrides})
    if opts.tta:
        raise UsageError("--tta averages the cached views of a run: predict the run directory, not its export")
    if opts.weights is not None:
        raise UsageError("--weights: an exported model holds its backbone's weights; drop --weights")
    classifier = OnnxClassifier(model, providers=_providers(opts.device))
    source = open_source(data) if isinstance(data, str) else data
    check_classes(source, classifier.classes)
    if opts.limit is not None:
        source = Subset(source, stratified_subset(source.labels(), opts.limit))
    preds, probs, labels = [], [], []
    with bar(len(source), "predict", progress=opts.progress) as pbar:
        for start in range(0, len(source), opts.batch_size):
            samples = [source[i] for i in range(start, min(start + opts.batch_size, len(source)))]
            p = softmax(classifier(np.stack([classifier.preprocess(s.image) for s in samples])))
            preds.append(p.argmax(-1))
            probs.append(p.max(-1))
            labels.append(np.asarray([s.label for s in samples], dtype=np.int64))
            pbar.update(len(samples))
    empty = np.zeros(0, np.int64)
    pred, prob, label = (np.concatenate(x) if x else empty for x in (preds, probs, labels))
    result = prediction_result(source.ids(), pred, prob, label, classifier.classes)
    if opts.csv_path is not None:
        write_predictions_csv(opts.csv_path, result["predictions"])
    acc = f", accuracy {result['accuracy']:.4f}" if "accuracy" in result else ""
    say(f"predicted {result['num_images']} images{acc}", quiet=not opts.progress)
    return result
