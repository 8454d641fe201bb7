"""Teachers made outside kdens, for the import and precomputed-scores tests.

One small PyTorch network, trained a few seconds on digits by plain torch (not kdens), written as
every form a user may hand over: its factory module, safetensors, a state_dict, a checkpoint dict,
a whole pickled module (to be refused), and ONNX files (dynamic batch NCHW, fixed batch 1 NHWC,
a softmax output, and two that do not fit the data).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

MODULE = "kdens_test_teacher_nets"
FACTORY_SOURCE = '''
import torch
from torch import nn


class Net(nn.Module):
    """64 -> hidden -> 10 on (B, 1, 8, 8) digits; ends in `head` so specialists can copy its rows."""

    def __init__(self, num_classes, input_shape, hidden=24):
        super().__init__()
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(64, hidden), nn.ReLU())
        self.head = nn.Linear(hidden, num_classes)

    def forward(self, x):
        return self.head(self.body(x))


def net(num_classes, input_shape, **kwargs):
    return Net(num_classes, input_shape, **kwargs)
'''


@dataclass
class TeacherFiles:
    folder: Path
    factory: str
    hidden: int
    model: nn.Module
    safetensors: Path
    state_dict: Path
    checkpoint: Path
    pickled: Path
    onnx: Path
    onnx_nhwc_b1: Path
    onnx_probs: Path
    onnx_wrong_input: Path
    onnx_wrong_classes: Path


class _NHWC(nn.Module):
    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, x):  # (B, H, W, C) -> the net's (B, C, H, W)
        return self.net(x.permute(0, 3, 1, 2))


class _Softmax(nn.Module):
    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, x):
        return torch.softmax(self.net(x), dim=1)


def _export(model: nn.Module, example: torch.Tensor, path: Path, dynamic: bool = True) -> Path:
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation notice
        torch.onnx.export(model, (example,), str(path), input_names=["x"], output_names=["scores"],
                          dynamic_axes={"x": {0: "n"}, "scores": {0: "n"}} if dynamic else None,
                          dynamo=False, opset_version=17)
    return path


def make_teacher_files(folder: Path, data, hidden: int = 24) -> TeacherFiles:
    """Write the factory module into ``folder`` (put on sys.path), train it on ``data`` and save every form."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{MODULE}.py").write_text(FACTORY_SOURCE)
    if str(folder) not in sys.path:
        sys.path.insert(0, str(folder))
    sys.modules.pop(MODULE, None)
    import importlib

    mod = importlib.import_module(MODULE)
    torch.manual_seed(0)
    model = mod.net(data.num_classes, data.input_shape, hidden=hidden)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    x, y = torch.as_tensor(data.x_train), torch.as_tensor(data.y_train)
    for _ in range(80):  # full-batch steps: ~97% test accuracy on digits
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    model.eval()
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    save_file(state, str(folder / "teacher.safetensors"))
    torch.save(state, folder / "teacher.pt")
    torch.save({"epoch": 80, "state_dict": state}, folder / "checkpoint.pt")
    torch.save(model, folder / "whole_module.pt")
    one = torch.zeros(1, *data.input_shape)
    wrong_in = mod.net(data.num_classes, (1, 10, 10), hidden=hidden)
    wrong_in.body[1] = nn.Linear(100, hidden)
    return TeacherFiles(
        folder=folder, factory=f"{MODULE}:net", hidden=hidden, model=model,
        safetensors=folder / "teacher.safetensors", state_dict=folder / "teacher.pt",
        checkpoint=folder / "checkpoint.pt", pickled=folder / "whole_module.pt",
        onnx=_export(model, one, folder / "teacher.onnx"),
        onnx_nhwc_b1=_export(_NHWC(model), one.permute(0, 2, 3, 1), folder / "nhwc_b1.onnx", dynamic=False),
        onnx_probs=_export(_Softmax(model), one, folder / "probs.onnx"),
        onnx_wrong_input=_export(wrong_in.eval(), torch.zeros(1, 1, 10, 10), folder / "wrong_input.onnx"),
        onnx_wrong_classes=_export(mod.net(9, data.input_shape, hidden=hidden).eval(), one,
                                   folder / "wrong_classes.onnx"),
    )
