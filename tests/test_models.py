import pytest
import torch

from kdens.errors import ModelError
from kdens.models import (MODELS, build_model, count_params, load_model, model_spec, parse_model_args,
                          save_model)


def tiny_factory(num_classes, input_shape, width=8):
    """A user model for the package.module:factory path (used by tests)."""
    class Tiny(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.body = torch.nn.Sequential(torch.nn.Flatten(),
                                            torch.nn.Linear(int(torch.tensor(input_shape).prod()), width),
                                            torch.nn.ReLU())
            self.head = torch.nn.Linear(width, num_classes)

        def forward(self, x):
            return self.head(self.body(x))
    return Tiny()


@pytest.mark.parametrize("name,kwargs", [("mlp", {"hidden": [32, 16], "dropout": 0.5, "input_dropout": 0.2}),
                                         ("cnn", {}), ("cnn", {"size": "large"}), ("lenet5", {})])
@pytest.mark.parametrize("shape", [(1, 8, 8), (1, 28, 28)])
def test_registry_models_forward(name, kwargs, shape):
    m = build_model(name, 7, shape, **kwargs)
    assert m(torch.rand(3, *shape)).shape == (3, 7)
    assert isinstance(m.head, torch.nn.Linear) and m.head.out_features == 7


def test_unknown_model_lists_valid():
    with pytest.raises(ModelError, match="valid: mlp, cnn, lenet5"):
        build_model("resnet", 10, (1, 8, 8))
    with pytest.raises(ModelError, match="bad --model-arg"):
        build_model("mlp", 10, (1, 8, 8), nonsense=3)
    with pytest.raises(ModelError, match="dropout"):
        build_model("mlp", 10, (1, 8, 8), dropout=1.5)
    with pytest.raises(ModelError, match="size"):
        build_model("cnn", 10, (1, 8, 8), size="huge")
    assert set(MODELS) == {"mlp", "cnn", "lenet5", "mobilenet"}


def test_user_factory():
    m = build_model("tests.test_models:tiny_factory", 4, (1, 8, 8), width=5)
    assert m(torch.rand(2, 1, 8, 8)).shape == (2, 4)
    with pytest.raises(ModelError, match="cannot import"):
        build_model("no_such_pkg.mod:f", 4, (1, 8, 8))
    with pytest.raises(ModelError, match="no callable"):
        build_model("tests.test_models:missing", 4, (1, 8, 8))


def test_parse_model_args():
    assert parse_model_args(["hidden=1200,1200", "dropout=0.5", "size=large", "batchnorm=true"]) == {
        "hidden": [1200, 1200], "dropout": 0.5, "size": "large", "batchnorm": True}
    assert parse_model_args({"input-dropout": 0.2}) == {"input_dropout": 0.2}
    with pytest.raises(ModelError, match="key=value"):
        parse_model_args(["hidden"])


def test_save_load_roundtrip(tmp_path):
    m = build_model("cnn", 10, (1, 8, 8)).eval()
    spec = model_spec("cnn", 10, (1, 8, 8), {})
    save_model(tmp_path, m, spec)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.json", "model.safetensors"]
    m2, spec2 = load_model(tmp_path)
    x = torch.rand(4, 1, 8, 8)
    assert torch.equal(m(x), m2(x))
    assert spec2["params"] == count_params(m)
