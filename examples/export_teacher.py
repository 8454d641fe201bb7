"""A stand-in for "the big model you already trained", for the README's "Your own data and teacher".

    python examples/export_teacher.py --data own-data/photos --out teacher.onnx

trains a small CNN with plain PyTorch (no kdens training loop) on an image folder and exports it
to ONNX with a dynamic batch axis: the file ``kdens import-model --onnx`` takes. It reads the
images with kdens's loader, so its classes are in kdens's order (the sorted folder names) and its
inputs are what kdens feeds a teacher: NCHW float32 in [0, 1]. A model trained elsewhere must
agree on both (kdens import-model checks the shapes and refuses one at chance). Seeded; without
arguments it trains on the embedded digits.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import logging
import warnings
from pathlib import Path

import torch
from torch import nn

from kdens.data import load_dataset


def cnn(channels: int, num_classes: int) -> nn.Module:
    """Three wide conv blocks and a linear head (about 370k weights): the big model of the story."""
    return nn.Sequential(
        nn.Conv2d(channels, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(64, 128, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(128, 256, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
        nn.Flatten(), nn.Linear(256, num_classes))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default="digits", help="an image folder, or any kdens data spec [digits]")
    p.add_argument("--out", type=Path, default=Path("teacher.onnx"), help="the ONNX file to write [teacher.onnx]")
    p.add_argument("--epochs", type=int, default=20)
    a = p.parse_args()
    data = load_dataset(a.data, val_fraction=0)  # every training example; kdens splits its own validation
    torch.manual_seed(0)
    model = cnn(data.input_shape[0], data.num_classes)
    x, y = torch.as_tensor(data.x_train), torch.as_tensor(data.y_train)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(a.epochs):
        for idx in torch.randperm(len(y)).split(64):
            opt.zero_grad()
            nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
    model.eval()
    with torch.no_grad():
        acc = (model(torch.as_tensor(data.x_test)).argmax(1).numpy() == data.y_test).mean()
    # the exporter reports its progress, and each torchvision op it could register
    logging.getLogger("torch.onnx._internal.exporter._registration").setLevel(logging.ERROR)
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (x[:2],), str(a.out), dynamo=True, external_data=False, input_names=["images"],
                          output_names=["logits"], dynamic_shapes=({0: torch.export.Dim("batch")},))
    print(f"wrote {a.out}: {data.num_classes} classes ({', '.join(data.class_names)}), input (N, "
          f"{', '.join(map(str, data.input_shape))}), test accuracy {acc:.3f}")


if __name__ == "__main__":
    main()
