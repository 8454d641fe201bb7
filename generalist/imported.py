"""``kdens import-model``: a teacher trained outside kdens becomes an ordinary generalist run folder.

Two sources (``kdens.imported`` holds the model-side code):

* ``--onnx FILE``: the file is copied into the folder as ``model.onnx`` and run by ONNX Runtime
  whenever a stage asks it for scores. Its input must be one example batch shaped like the
  data's samples (NCHW, or NHWC for images; the batch axis may be fixed) and its output
  (N, C) for the data's C classes.
* ``--model pkg.module:factory --weights FILE [--model-arg k=v]``: the factory builds the
  network, the weights (safetensors, or a state_dict read with ``torch.load(weights_only=True)``)
  are loaded strictly, and it is saved as ``model.safetensors`` + ``model.json`` like any
  kdens model.

Either way the folder gets ``metrics.json`` (the same test / validation metrics a trained
generalist has, on this data's test split), an empty ``history.json`` and ``manifest.json``
(stage ``generalist``) recording the source file's path and sha256; every file is in the
manifest's output hashes, so an edited ``model.onnx`` is refused like any damaged run folder.
The imported model sees the inputs exactly as kdens loads them (uint8 images scaled to [0, 1],
other values as they are): no normalization is added, the model brings its own.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from kdens.artifacts import atomic_write_bytes, atomic_write_json, sha256_file, write_manifest
from kdens.config import INTERNAL, to_dict
from kdens.data import resolve_spec
from kdens.errors import ConfigError, ModelError
from kdens.evaluate import evaluate_model
from kdens.imported import (ONNX_FILE, OnnxModel, count_onnx_params, inspect_onnx, load_into, load_weights,
                            looks_like_probabilities)
from kdens.models import build_model, count_params, model_spec, save_model
from kdens.runs import data_config, load_data, prepare_run_dir
from kdens.train import predict_logits


@dataclass
class ImportConfig:
    """``kdens import-model``: one of ``onnx`` or ``model`` + ``weights``, and the data it is evaluated on."""

    onnx: str | None = None
    """--onnx: an ONNX file to import (run by ONNX Runtime)."""
    model: str | None = None
    """--model: package.module:factory (or a registry name) that builds the PyTorch network."""
    weights: str | None = None
    """--weights: its weights, .safetensors or a state_dict saved with torch.save."""
    model_args: dict = field(default_factory=dict)
    """--model-arg: the factory's keyword arguments, as the model was trained with."""
    data: str = "digits"
    """The data the teacher classifies (its classes in kdens's order: labels sorted)."""
    val_fraction: float = 0.1
    """Share of the training set held out (stratified) for validation, as later stages will use it."""
    split_seed: int = 0
    """Seed of the validation split (fixed across stages)."""
    layout: str = "auto"
    """--layout: auto, nchw, nhwc or features."""
    label_column: str | None = None
    """--label-column: a CSV's label column (default: the last one)."""
    test_fraction: float = 0.2
    """--test-fraction: test share carved from a CSV or image folder without a test split."""
    image_size: str | None = None
    """--image-size: H,W to resize an image folder's images to."""
    eval_batch_size: int = field(default=256, metadata=INTERNAL)
    """Examples per scoring call."""

    def __post_init__(self):
        self.data = resolve_spec(self.data)
        if (self.onnx is None) == (self.model is None):
            raise ConfigError("kdens import-model needs exactly one of --onnx FILE or --model pkg.module:factory "
                              "--weights FILE" + (" (both were given)" if self.onnx else ""))
        if self.onnx is not None and (self.weights is not None or self.model_args):
            raise ConfigError(f"--onnx {self.onnx} carries its own weights and architecture; drop --weights and "
                              "--model-arg (they go with --model)")
        if self.model is not None and self.weights is None:
            raise ConfigError(f"--model {self.model} needs --weights FILE (.safetensors, or a state_dict saved "
                              "with torch.save): an imported model is not trained here")
        for flag, value in (("--onnx", self.onnx), ("--weights", self.weights)):
            if value is not None:
                path = Path(value).expanduser()
                if not path.is_file():
                    raise ConfigError(f"{flag} {value}: no such file")
                setattr(self, flag[2:], str(path.resolve()))  # manifests find it from any folder
        if not 0.0 <= self.val_fraction < 1.0:
            raise ConfigError(f"--val-fraction {self.val_fraction} must be in [0, 1)")


def _majority(y: np.ndarray) -> float:
    return float(np.bincount(y).max() / len(y)) if len(y) else 0.0


def run(cfg: ImportConfig, run_dir: Path, *, resume: bool = False, force: bool = False,
        progress: bool = True) -> Path:
    """Import the model ``cfg`` names into ``run_dir`` (a generalist folder) and return the folder.

    ``resume`` has nothing to continue (an import is one step) and is accepted for the stage contract.
    """
    t0 = time.time()
    run_dir = Path(run_dir)
    data = load_data(dataclasses.asdict(cfg))
    # everything that can fail on bad input happens before the first write
    if cfg.onnx is not None:
        source = Path(cfg.onnx)
        io = inspect_onnx(source, data.input_shape, data.layout, data.num_classes, cfg.data)
        spec = {**model_spec("onnx", data.num_classes, data.input_shape, {}), "format": "onnx",
                "onnx": {**io, "outputs": "scores"}}
        model = OnnxModel(source, spec)
        probe = predict_logits(model, data.x_test[:256], cfg.eval_batch_size).numpy()
        if probe.ndim != 2 or probe.shape[1] != data.num_classes:
            raise ModelError(f"--onnx {source} answered scores shaped {tuple(probe.shape)} for "
                             f"{min(256, len(data.x_test))} examples, but --data {cfg.data} has {data.num_classes} "
                             f"classes; export a model whose output is (N, {data.num_classes})")
        if looks_like_probabilities(probe):  # the graph ends in a softmax: use log p as the scores
            spec["onnx"]["outputs"] = "probabilities"
            model = OnnxModel(source, spec)
        params = count_onnx_params(source)
    else:
        source = Path(cfg.weights)
        model = build_model(cfg.model, data.num_classes, data.input_shape, **cfg.model_args)
        state, where = load_weights(source)
        load_into(model, state, source, cfg.model)
        model.eval()
        spec = model_spec(cfg.model, data.num_classes, data.input_shape, cfg.model_args)
        params = count_params(model)
    metrics = evaluate_model(model, data, cfg.eval_batch_size)
    if not np.isfinite(metrics["test_nll"]):
        raise ModelError(f"{source} answers NaN or infinite scores on the test split of {cfg.data}; "
                         "check the exported graph")
    chance = _majority(data.y_test)
    if metrics["test_accuracy"] <= chance:
        raise ModelError(f"{source} is at chance on the test split of {cfg.data} (accuracy "
                         f"{metrics['test_accuracy']:.3f}, the largest class alone {chance:.3f}): its classes must be "
                         f"in kdens's order ({', '.join(data.class_names[:6])}{', ...' if data.num_classes > 6 else ''}: "
                         "labels sorted) and it must take the inputs as kdens loads them (uint8 images in [0, 1])")
    prepare_run_dir(run_dir, resume, force, "generalist")

    run_dir.mkdir(parents=True, exist_ok=True)
    source_sha = sha256_file(source)
    imported = {"format": "onnx" if cfg.onnx else "pytorch", "source": str(source), "sha256": source_sha}
    if cfg.onnx is not None:
        atomic_write_bytes(run_dir / ONNX_FILE, source.read_bytes())
        atomic_write_json(run_dir / "model.json", {**spec, "params": params})
        imported.update(layout=spec["onnx"]["layout"], outputs=spec["onnx"]["outputs"])
    else:
        save_model(run_dir, model, spec)
        imported["weights_from"] = where
    metrics.update(params=params, imported=imported["format"], train_examples=0, train_seconds=0.0)
    atomic_write_json(run_dir / "metrics.json", metrics)
    atomic_write_json(run_dir / "history.json", [])  # nothing was trained here
    config = to_dict(cfg)
    write_manifest(run_dir, stage="generalist", config=config, inputs={str(source): source_sha},
                   data_fingerprint=data.fingerprint, seed=None, wall_seconds=round(time.time() - t0, 3),
                   metrics=metrics, extra={"data": data.describe(), "data_config": data_config({"config": config}),
                                           "imported": imported})
    return run_dir
