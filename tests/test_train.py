import pytest
import torch
import torch.nn.functional as F

from kdens.errors import ConfigError, TrainingError
from kdens.models import build_model
from kdens.train import TrainConfig, apply_max_norm, fit, jitter_batch, lr_at, predict_logits


def _acc(model, x, y):
    return float((predict_logits(model, x).argmax(1).numpy() == y).mean())


def test_short_training_on_digits_reaches_stated_accuracy(digits):
    # Stated target: an MLP reaches >= 0.95 test accuracy on digits in 15 epochs.
    m = build_model("mlp", 10, digits.input_shape, hidden=[128])
    res = fit(m, digits.x_train, digits.y_train, digits.x_val, digits.y_val,
              TrainConfig(epochs=15, batch_size=64, seed=0), progress=False)
    assert _acc(m, digits.x_test, digits.y_test) >= 0.95
    assert len(res.history) == 15 and res.best_epoch >= 1
    assert res.history[-1]["train_loss"] < res.history[0]["train_loss"]


def test_training_is_deterministic_on_cpu(digits):
    def once():
        torch.manual_seed(0)
        m = build_model("mlp", 10, digits.input_shape, hidden=[32], dropout=0.3)
        fit(m, digits.x_train, digits.y_train, digits.x_val, digits.y_val,
            TrainConfig(epochs=2, batch_size=64, jitter=1, seed=7), progress=False)
        return m.state_dict()
    a, b = once(), once()
    assert all(torch.equal(a[k], b[k]) for k in a)


class _Interrupt(Exception):
    pass


def test_resume_after_interruption_equals_uninterrupted_run(digits, tmp_path):
    cfg = TrainConfig(epochs=5, batch_size=64, jitter=1, seed=3, patience=None)
    x, y, xv, yv = digits.x_train, digits.y_train, digits.x_val, digits.y_val

    def model():
        torch.manual_seed(0)
        return build_model("mlp", 10, digits.input_shape, hidden=[32], dropout=0.3)

    ref = model()
    fit(ref, x, y, xv, yv, cfg, ckpt_dir=tmp_path / "ref", progress=False, run_key="k")

    calls = {"n": 0}
    steps = -(-len(y) // 64)

    def crashing_loss(logits, xb, yb, idx):
        calls["n"] += 1
        if calls["n"] == 3 * steps + 5:  # in the 4th epoch
            raise _Interrupt
        return F.cross_entropy(logits, yb)

    m = model()
    with pytest.raises(_Interrupt):
        fit(m, x, y, xv, yv, cfg, loss_fn=crashing_loss, ckpt_dir=tmp_path / "run", progress=False, run_key="k")
    m2 = model()
    res = fit(m2, x, y, xv, yv, cfg, ckpt_dir=tmp_path / "run", resume=True, progress=False, run_key="k")
    assert res.resumed_from_epoch == 3
    assert len(res.history) == 5
    ref_state = ref.state_dict()
    assert all(torch.equal(ref_state[k], v) for k, v in m2.state_dict().items())
    with pytest.raises(TrainingError, match="other settings"):
        fit(model(), x, y, xv, yv, cfg, ckpt_dir=tmp_path / "run", resume=True, progress=False, run_key="other")


def test_nan_loss_names_epoch_and_step(digits):
    m = build_model("mlp", 10, digits.input_shape, hidden=[16])
    steps = {"n": 0}
    per_epoch = -(-len(digits.y_train) // 64)

    def loss(logits, xb, yb, idx):
        steps["n"] += 1
        base = F.cross_entropy(logits, yb)
        return base * float("nan") if steps["n"] == per_epoch + 6 else base

    with pytest.raises(TrainingError, match=r"epoch 2, step 6"):
        fit(m, digits.x_train, digits.y_train, None, None, TrainConfig(epochs=3, batch_size=64), loss_fn=loss,
            progress=False)


def test_a_network_whose_units_died_stops_with_the_fix(digits, tmp_path):
    """Dead ReLUs: the output no longer depends on the input, so the run stops, not 'succeeds'."""
    m = build_model("mlp", 10, digits.input_shape, hidden=[16])
    with torch.no_grad():
        m.body[0].bias.fill_(-1e3)  # every hidden unit negative on every input: no gradient revives them
    with pytest.raises(TrainingError, match=r"stopped depending on its input at epoch 1.*--grad-clip"):
        fit(m, digits.x_train, digits.y_train, digits.x_val, digits.y_val, TrainConfig(epochs=3, batch_size=64),
            ckpt_dir=tmp_path, progress=False)
    assert not (tmp_path / "checkpoint.pt").exists()  # nothing saved from the dead epoch

    alive = build_model("mlp", 10, digits.input_shape, hidden=[16])  # same data, healthy init: no error
    fit(alive, digits.x_train, digits.y_train, digits.x_val, digits.y_val, TrainConfig(epochs=1, batch_size=64),
        progress=False)


def test_early_stopping_and_best_weights(digits):
    m = build_model("mlp", 10, digits.input_shape, hidden=[64])
    res = fit(m, digits.x_train, digits.y_train, digits.x_val, digits.y_val,
              TrainConfig(epochs=60, batch_size=32, lr=0.3, schedule="none", patience=2, optimizer="sgd"),
              progress=False)
    assert res.stopped_early and len(res.history) < 60
    best = min(h["val_loss"] for h in res.history)
    assert res.best_val_loss == pytest.approx(best)
    val_loss = float(F.cross_entropy(predict_logits(m, digits.x_val), torch.as_tensor(digits.y_val)))
    assert val_loss == pytest.approx(best, rel=1e-4)


def test_jitter_translates_within_k():
    x = torch.zeros(50, 1, 9, 9)
    x[:, 0, 4, 4] = 1.0
    g = torch.Generator().manual_seed(0)
    out = jitter_batch(x, 2, g)
    pos = out[:, 0].flatten(1).argmax(1)
    rows, cols = pos // 9, pos % 9
    assert out.sum().item() == 50  # nothing lost: the dot stays inside the frame
    assert rows.min() >= 2 and rows.max() <= 6 and cols.min() >= 2 and cols.max() <= 6
    assert len(set(zip(rows.tolist(), cols.tolist()))) > 5  # genuinely random shifts
    assert torch.equal(jitter_batch(x, 0, g), x)


def test_max_norm_constraint():
    m = build_model("mlp", 10, (1, 8, 8), hidden=[32])
    with torch.no_grad():
        m.body[0].weight.mul_(100)
    apply_max_norm(m, 2.0)
    assert m.body[0].weight.norm(dim=1).max() <= 2.0 + 1e-5


def test_schedules():
    cfg = TrainConfig(epochs=10, lr=1.0, schedule="cosine")
    assert lr_at(cfg, 0, 0, 5) == pytest.approx(1.0)
    assert lr_at(cfg, 5, 0, 5) == pytest.approx(0.5)
    step = TrainConfig(epochs=10, lr=1.0, schedule="step", step_size=3, gamma=0.5)
    assert lr_at(step, 7, 0, 5) == pytest.approx(0.25)


@pytest.mark.parametrize("kwargs,flag", [({"epochs": 0}, "--epochs"), ({"optimizer": "rmsprop"}, "--optimizer"),
                                         ({"jitter": -1}, "--jitter"), ({"device": "tpu"}, "--device"),
                                         ({"lr": 0.0}, "--lr")])
def test_config_validation_names_flag(kwargs, flag):
    with pytest.raises(ConfigError, match=flag):
        TrainConfig(**kwargs)


def test_grad_clip_bounds_each_update(digits):
    # With plain SGD (no momentum, no decay) one step moves the weights by lr * clipped grad.
    m = build_model("mlp", 10, digits.input_shape, hidden=[16])
    before = [p.detach().clone() for p in m.parameters()]
    cfg = TrainConfig(epochs=1, batch_size=len(digits.y_train), optimizer="sgd", lr=1.0, momentum=0.0,
                      weight_decay=0.0, schedule="none", grad_clip=0.01, patience=None)
    fit(m, digits.x_train, digits.y_train, None, None, cfg, loss_fn=lambda z, xb, yb, idx: 1000 * F.cross_entropy(z, yb),
        progress=False)
    step = torch.sqrt(sum(((p.detach() - b) ** 2).sum() for p, b in zip(m.parameters(), before)))
    assert step.item() == pytest.approx(0.01, rel=1e-3)
