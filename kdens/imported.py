"""Models trained outside kdens: an ONNX file run by ONNX Runtime, and PyTorch weights read safely.

``kdens import-model`` (``generalist.imported``) turns either into an ordinary generalist run
folder. A PyTorch model becomes ``model.safetensors`` + ``model.json`` like any kdens model
(its factory rebuilds it). An ONNX file is kept as ``model.onnx`` beside a ``model.json`` with
``"format": "onnx"``, and :func:`kdens.models.load_model` answers it with :class:`OnnxModel`:
an ``nn.Module`` whose forward runs ONNX Runtime, so every stage that only *scores* with a
model (teachers, ``kdens evaluate``, online teaching under ``--jitter``) takes it as it is.
Stages that need the network's modules or gradients (specialists start from its weights,
feature methods hook its layers, deploy exports it) call :func:`require_torch` and refuse it
with one line.

Spine code: imports no stage; onnx / onnxruntime are imported where used.
"""

from __future__ import annotations

import pickle
import re
from pathlib import Path

import numpy as np
import torch
from torch import nn

from kdens.errors import ModelError

ONNX_FILE = "model.onnx"
PROBS_TOLERANCE = 1e-3
"""Rows that are non-negative and sum to 1 within this are probabilities, not logits."""


def is_onnx_spec(spec: dict) -> bool:
    """Whether a ``model.json`` describes an imported ONNX file."""
    return spec.get("format") == "onnx"


def looks_like_probabilities(scores: np.ndarray) -> bool:
    """Every row non-negative and summing to 1: probabilities (logits and log-probabilities are not:
    log-probabilities are <= 0 and their exponentials sum to 1, logits are unconstrained)."""
    s = np.asarray(scores, dtype=np.float64)
    return bool(s.size) and bool((s >= 0).all()) and bool(np.allclose(s.sum(1), 1.0, atol=PROBS_TOLERANCE))


# ---------------------------------------------------------------- ONNX


def _session(path: Path):
    try:
        import onnxruntime as ort
    except ImportError:
        raise ModelError(f"{path} is an ONNX model and ONNX Runtime is not installed; install kdens[onnx] "
                         "(make setup does)") from None

    opts = ort.SessionOptions()
    # share the CPU budget torch was given (OMP_NUM_THREADS, torch.set_num_threads)
    opts.intra_op_num_threads = max(1, torch.get_num_threads())
    opts.inter_op_num_threads = 1
    try:
        return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    except Exception as e:  # ORT raises its own exception types for unreadable or invalid files
        raise ModelError(f"--onnx {path}: ONNX Runtime cannot load it ({type(e).__name__}: "
                         f"{str(e).splitlines()[0] if str(e) else ''}); export it again with torch.onnx.export "
                         "or check the file") from None


def _dims(shape) -> list:
    """ONNX dims as ints, None for a symbolic or unknown one."""
    return [d if isinstance(d, int) and d > 0 else None for d in shape]


def _show(dims: list) -> str:
    return "[" + ", ".join("N" if d is None else str(d) for d in dims) + "]"


def inspect_onnx(path: Path, input_shape: tuple[int, ...], layout: str, num_classes: int,
                 data_name: str) -> dict:
    """Check an ONNX classifier against the data; return how to call it.

    One float input of shape (N, *sample) in the data's layout (NCHW, or NHWC for images; the
    batch axis may be fixed, then calls are chunked), one output (N, C) with C the number of
    classes. Raises ModelError naming both sides when they disagree.

    Returns:
        ``{"input": name, "layout": "nchw"|"nhwc"|"features", "batch": int | None, "output": name}``.
    """
    sess = _session(path)
    inputs, outputs = sess.get_inputs(), sess.get_outputs()
    if len(inputs) != 1:
        raise ModelError(f"--onnx {path} has {len(inputs)} inputs ({', '.join(i.name for i in inputs)}); "
                         "a teacher takes one input, the examples; export a graph with one input")
    inp = inputs[0]
    if inp.type not in ("tensor(float)",):
        raise ModelError(f"--onnx {path}: its input {inp.name!r} is {inp.type}, but kdens feeds float32 "
                         "(uint8 images scaled to [0, 1]); export the model with a float input")
    dims = _dims(inp.shape)
    sample = tuple(int(d) for d in input_shape)
    c = sample[0] if len(sample) == 3 else None
    candidates = {"nchw" if len(sample) == 3 else "features": sample}
    if len(sample) == 3:
        candidates["nhwc"] = (sample[1], sample[2], sample[0])
    found = [name for name, want in candidates.items()
             if len(dims) == len(want) + 1 and all(d is None or d == w for d, w in zip(dims[1:], want))]
    if not found:
        said = f"({', '.join(map(str, sample))}) per example, {layout} as loaded" + (
            f" (NCHW inside kdens; NHWC would be [N, {sample[1]}, {sample[2]}, {c}])" if c is not None else "")
        raise ModelError(f"--onnx {path} takes input {inp.name!r} shaped {_show(dims)}, but --data {data_name} "
                         f"holds samples of {said}; export the model for this data's sample shape "
                         "(or pass --image-size H,W to resize an image folder)")
    # NCHW first: kdens's own layout, and the only reading when the two coincide (C == H == W)
    chosen = found[0]
    batch = dims[0]
    out = outputs[0]
    if len(outputs) != 1:
        raise ModelError(f"--onnx {path} has {len(outputs)} outputs ({', '.join(o.name for o in outputs)}); "
                         f"a teacher answers one (N, {num_classes}) output of scores; export only the logits")
    odims = _dims(out.shape)
    if len(odims) != 2 or (odims[1] is not None and odims[1] != num_classes):
        raise ModelError(f"--onnx {path} answers output {out.name!r} shaped {_show(odims)}, but --data {data_name} "
                         f"has {num_classes} classes; export a model whose output is (N, {num_classes}) scores "
                         "for these classes (in the data's class order)")
    return {"input": inp.name, "layout": chosen, "batch": batch, "output": out.name}


class OnnxModel(nn.Module):
    """An imported ONNX classifier as a torch module: ``forward`` runs ONNX Runtime (CPU).

    Inputs are kdens's (B, C, H, W) or (B, D) float32; they are transposed to NHWC when the
    file wants it and fed in chunks of its fixed batch size when it has one (padding the last),
    so it answers any batch size. Outputs are the file's scores, or their log when it answers
    probabilities: either way a distribution's logits up to a constant per row. It has no
    parameters and no gradient: kdens can score with it, not train or export it.
    """

    def __init__(self, path: Path, spec: dict):
        super().__init__()
        self.path = Path(path)
        self.io = dict(spec["onnx"])
        self.num_classes = int(spec["num_classes"])
        self._sess = _session(self.path)
        # an empty parameter: code that asks a model for its device (next(model.parameters())) gets one
        self.anchor = nn.Parameter(torch.empty(0), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        arr = x.detach().float().cpu().numpy()
        if self.io["layout"] == "nhwc":
            arr = arr.transpose(0, 2, 3, 1)
        arr = np.ascontiguousarray(arr, dtype=np.float32)
        step = self.io.get("batch") or max(1, len(arr))
        outs = []
        for i in range(0, len(arr), step):
            chunk = arr[i: i + step]
            n = len(chunk)
            if n < step and self.io.get("batch"):  # a fixed batch axis: pad the last chunk, keep n rows
                chunk = np.concatenate([chunk, np.zeros((step - n, *chunk.shape[1:]), np.float32)])
            outs.append(np.asarray(self._sess.run([self.io["output"]], {self.io["input"]: chunk})[0])[:n])
        out = torch.from_numpy(np.concatenate(outs).astype(np.float32)) if outs else \
            torch.empty(0, self.num_classes)  # (B, C)
        if self.io.get("outputs") == "probabilities":
            out = torch.log(out.clamp_min(1e-30))  # (B, C) log-probabilities
        return out.to(x.device)


def count_onnx_params(path: Path) -> int:
    """Elements of the file's initializers: its weights, as ``count_params`` counts a torch model's."""
    try:
        import onnx
    except ImportError:
        raise ModelError(f"{path}: reading an ONNX file needs the onnx package; install kdens[onnx] "
                         "(make setup does)") from None

    graph = onnx.load(str(path), load_external_data=False).graph
    return int(sum(int(np.prod(t.dims)) if len(t.dims) else 1 for t in graph.initializer))


def require_torch(model: nn.Module, run_dir: Path, why: str) -> None:
    """Refuse an imported ONNX model where a stage needs the PyTorch network itself.

    ``why`` says what the stage does with it ("specialists start from the generalist's weights").
    """
    if isinstance(model, OnnxModel):
        raise ModelError(f"{run_dir} holds an imported ONNX model, which kdens can run but not train or "
                         f"export, and {why}; import the PyTorch model instead (kdens import-model --model "
                         "pkg.module:factory --weights FILE), or distill a student from this teacher and use that")


# ---------------------------------------------------------------- PyTorch weights


def _tensor_dict(obj) -> dict[str, torch.Tensor] | None:
    if isinstance(obj, dict) and obj and all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                             for k, v in obj.items()):
        return obj
    return None


def load_weights(path: Path) -> tuple[dict[str, torch.Tensor], str]:
    """A state_dict from safetensors, or from a torch file read with ``weights_only=True``.

    Never unpickles arbitrary objects: a file holding a whole pickled module (or any other
    object) is refused, naming what it holds. A checkpoint dict whose ``state_dict`` or
    ``model`` entry is the state_dict is accepted; DDP's ``module.`` prefix is dropped.

    Returns:
        (state_dict, where it was found: "safetensors", "state_dict", or "state_dict['KEY']").
    """
    path = Path(path)
    if not path.is_file():
        raise ModelError(f"--weights {path}: no such file")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            state, where = load_file(str(path)), "safetensors"
        except Exception as e:  # safetensors raises its own error type for a bad header
            raise ModelError(f"--weights {path}: not a readable safetensors file ({e})") from None
    else:
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as e:
            found = re.search(r"Unsupported global: GLOBAL ([\w.]+)", str(e))
            if found is None:  # not a pickle at all (torch reads garbage as a bad pickle)
                raise ModelError(f"--weights {path}: not a readable PyTorch file ({str(e).splitlines()[0]}); give a "
                                 "state_dict saved with torch.save, or a .safetensors file") from None
            raise ModelError(f"--weights {path}: refused: the file pickles Python objects, not only tensors "
                             f"(it holds a {found.group(1)} object); kdens never unpickles code. Save the weights "
                             "alone: torch.save(model.state_dict(), FILE) or safetensors.torch.save_file") from None
        except Exception as e:  # torch.load raises RuntimeError / EOFError / ... for a truncated or foreign file
            raise ModelError(f"--weights {path}: not a readable PyTorch file ({type(e).__name__}: "
                             f"{str(e).splitlines()[0] if str(e) else ''}); give a state_dict saved with "
                             "torch.save, or a .safetensors file") from None
        state, where = _tensor_dict(obj), "state_dict"
        if state is None and isinstance(obj, dict):
            for key in ("state_dict", "model"):
                if _tensor_dict(obj.get(key)) is not None:
                    state, where = obj[key], f"state_dict[{key!r}]"
                    break
        if state is None:
            what = (f"a dict with keys {', '.join(map(str, list(obj)[:8]))}" if isinstance(obj, dict)
                    else type(obj).__name__)
            raise ModelError(f"--weights {path} holds {what}, not a state_dict (names -> tensors); "
                             "save model.state_dict()")
    if state and all(k.startswith("module.") for k in state):  # saved from a DDP-wrapped model
        state = {k[len("module."):]: v for k, v in state.items()}
    return state, where


def load_into(model: nn.Module, state: dict[str, torch.Tensor], path: Path, factory: str) -> None:
    """``model.load_state_dict(state)`` strictly; a mismatch names the first keys and shapes that differ."""
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    wrong = [f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}" for k in own
             if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or wrong:
        parts = []
        if missing:
            parts.append(f"missing {', '.join(missing[:4])}" + (" ..." if len(missing) > 4 else ""))
        if unexpected:
            parts.append(f"unexpected {', '.join(unexpected[:4])}" + (" ..." if len(unexpected) > 4 else ""))
        if wrong:
            parts.append(f"shapes differ: {', '.join(wrong[:3])}")
        raise ModelError(f"--weights {path} does not fit --model {factory} ({'; '.join(parts)}); pass the "
                         "--model-arg values the model was trained with, or the matching weights")
    model.load_state_dict({k: v.to(own[k].dtype) for k, v in state.items()})
