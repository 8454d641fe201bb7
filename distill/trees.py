"""Tree students: a decision tree or histogram gradient boosting fitted to the teacher's soft targets.

A tree is grown, not trained by back-propagation, so it cannot take the KD loss the way a
network does. Both students fit the KD target distribution instead,

    q = alpha * onehot(y) + (1 - alpha) * softmax(s / T)        # (N, C)

(``s`` the teacher's soft scores from the cache, ``alpha`` = 0 on unlabeled transfer sets):

* ``tree`` (scikit-learn ``DecisionTreeRegressor``, multi-output squared error on ``q``):
  Buciluǎ, Caruana & Niculescu-Mizil (2006) regress the teacher's probabilities. A leaf then
  predicts the mean of its examples' ``q``, which is a distribution and is also the leaf value
  that minimises ``sum_i KL(q_i || leaf)``, so the tree's output is what the KD objective asks
  of a piecewise-constant model; the squared error of the mixture equals
  ``alpha * ||f - onehot||^2 + (1 - alpha) * ||f - p_T||^2`` up to a constant, so alpha keeps
  its KD meaning. On one-hot targets the criterion is the Gini impurity, so the hard-label
  twin (a ``DecisionTreeClassifier`` of the same settings) is the same model on hard labels.
* ``gbt`` (``HistGradientBoostingClassifier``, multinomial log-loss): boosting fits additive
  logits, and its log-loss takes soft labels as weighted rows: each example appears once per
  class c with ``q_c >= MIN_WEIGHT`` (weight ``q_c``), so the loss it minimises is
  ``sum_i sum_c q_ic * -log softmax(f(x_i))_c = alpha * CE(y, f) + (1 - alpha) * CE(p_T, f)``,
  the KD objective itself (the T^2 factor only rescales it); the dropped mass is below
  ``MIN_WEIGHT`` per class. Its hard-label twin is the same classifier on the labels. (One
  regressor per class on the centred log q was tried first: on the tabular benchmark it made
  322 test errors where its twin made 288; this formulation made 277, BENCHMARKS.md.)

Inputs are used as the dataset gives them, flattened: splits on one feature are invariant to
the per-feature standardisation networks need. The exported ONNX graph takes the dataset's
own input shape ``x`` (N, ...) and answers ``probabilities`` (N, C).
"""

from __future__ import annotations

import contextlib
from typing import Any

import numpy as np

from kdens.errors import ConfigError

TREE_MODELS = ("tree", "gbt")
MIN_WEIGHT = 1e-3
"""gbt: a class with a smaller target probability gets no weighted row (keeps the rows near N, not N*C)."""

# the settings each student accepts, as (type, minimum, default); None: scikit-learn's default
PARAMS: dict[str, dict[str, tuple[type, float, Any]]] = {
    "tree": {"max_depth": (int, 1, 8), "min_samples_leaf": (int, 1, 1), "max_leaf_nodes": (int, 2, None),
             "min_samples_split": (int, 2, 2)},
    "gbt": {"max_iter": (int, 1, 100), "learning_rate": (float, 0.0, 0.1), "max_depth": (int, 1, None),
            "max_leaf_nodes": (int, 2, 31), "min_samples_leaf": (int, 1, 20), "l2_regularization": (float, 0.0, 0.0)},
}


def is_tree(model: str | None) -> bool:
    """Whether ``--model`` names a tree student."""
    return model in TREE_MODELS


def check_installed(model: str) -> None:
    """A tree student is stored as ONNX: refuse before any work when the converter or runtime is missing."""
    import importlib.util

    missing = [m for m in ("skl2onnx", "onnx", "onnxruntime") if importlib.util.find_spec(m) is None]
    if missing:
        raise ConfigError(f"--model {model} stores the fitted student as ONNX, which needs {', '.join(missing)}: "
                          "pip install 'kdens[trees]' (make setup installs it)")


def resolve_args(model: str, args: dict) -> dict:
    """``--model-arg`` values checked and completed with the defaults (one ConfigError line if bad)."""
    known = PARAMS[model]
    unknown = sorted(set(args) - set(known))
    if unknown:
        raise ConfigError(f"--model {model} has no setting {', '.join(unknown)}; valid: {', '.join(known)} "
                          f"(e.g. --model-arg max_depth=8)")
    out = {}
    for key, (kind, low, default) in known.items():
        value = args.get(key, default)
        if value is not None:
            if isinstance(value, bool) or not isinstance(value, (int, float)) or (kind is int and value != int(value)):
                raise ConfigError(f"--model-arg {key}={value!r} must be {'an integer' if kind is int else 'a number'}"
                                  f" >= {low:g}, e.g. {key}={default if default is not None else int(low) + 1}")
            value = kind(value)
            if value < low or (kind is float and key == "learning_rate" and value <= 0):
                raise ConfigError(f"--model-arg {key}={value} must be {'> 0' if key == 'learning_rate' else f'>= {low:g}'}")
        out[key] = value
    return out


def target_distribution(scores: np.ndarray, temperature: float, alpha: float, y: np.ndarray | None) -> np.ndarray:
    """``q = alpha * onehot(y) + (1 - alpha) * softmax(s / T)`` (N, C); alpha ignored without labels."""
    z = np.asarray(scores, np.float64) / float(temperature)  # (N, C)
    p = np.exp(z - z.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    if y is None or not alpha:
        return p
    onehot = np.eye(p.shape[1])[np.asarray(y)]  # (N, C)
    return alpha * onehot + (1.0 - alpha) * p


def weighted_rows(q: np.ndarray, min_weight: float = MIN_WEIGHT) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Soft labels as weighted hard rows: (example index, class, weight q_ic) for every q_ic >= min_weight.

    Every class keeps at least its most probable example, so the classifier knows all C classes.
    """
    rows, cls = np.nonzero(q >= min_weight)
    missing = np.setdiff1d(np.arange(q.shape[1]), cls)
    rows = np.concatenate([rows, q[:, missing].argmax(0)])
    cls = np.concatenate([cls, missing])
    return rows, cls, q[rows, cls]


def fit_student(model: str, args: dict, x: np.ndarray, q: np.ndarray, seed: int):
    """The student fitted to the target distribution ``q`` (N, C) on inputs ``x`` (N, ...)."""
    flat = x.reshape(len(x), -1)
    if model == "tree":
        from sklearn.tree import DecisionTreeRegressor

        return DecisionTreeRegressor(criterion="squared_error", random_state=seed, **args).fit(flat, q)
    from sklearn.ensemble import HistGradientBoostingClassifier

    rows, cls, w = weighted_rows(q)
    # early stopping would carve its own validation split out of the transfer set: off, the
    # settings say how many iterations
    est = HistGradientBoostingClassifier(random_state=seed, early_stopping=False, **args)
    return est.fit(flat[rows], cls, sample_weight=w)


def fit_twin(model: str, args: dict, x: np.ndarray, y: np.ndarray, seed: int):
    """The hard-label twin: the same kind and settings fitted to the labels (the gap_recovered baseline)."""
    flat = x.reshape(len(x), -1)
    if model == "tree":
        from sklearn.tree import DecisionTreeClassifier

        return DecisionTreeClassifier(random_state=seed, **args).fit(flat, y)
    from sklearn.ensemble import HistGradientBoostingClassifier

    return HistGradientBoostingClassifier(random_state=seed, early_stopping=False, **args).fit(flat, y)


def predict_proba(est, x: np.ndarray, num_classes: int) -> np.ndarray:
    """Probabilities (N, C) float32 of a fitted student or twin."""
    flat = x.reshape(len(x), -1)
    if hasattr(est, "predict_proba"):  # classes never seen in training get probability 0
        p = np.zeros((len(x), num_classes))
        p[:, est.classes_] = est.predict_proba(flat)
        return p.astype(np.float32)
    return np.asarray(est.predict(flat), np.float32).reshape(len(x), -1)  # a regression tree: (N, C) leaf means


def log_scores(proba: np.ndarray) -> np.ndarray:
    """Log-probabilities (N, C) for kdens.metrics; a zero probability counts as 1e-12."""
    return np.log(np.maximum(np.asarray(proba, np.float64), 1e-12))


def size(est, num_classes: int) -> dict:
    """Nodes, leaves and ``params`` = the numbers the model stores (2 per split, C per leaf)."""
    if hasattr(est, "tree_"):  # one tree: a split stores feature and threshold, a leaf C probabilities
        nodes, leaves, per_leaf = int(est.tree_.node_count), int(est.tree_.n_leaves), num_classes
    else:  # histogram gradient boosting: one predictor per iteration (and class), a leaf stores one value
        preds = [p for e in getattr(est, "estimators_", [est]) for it in e._predictors for p in it]
        nodes = sum(len(p.nodes) for p in preds)
        leaves = sum(int(p.nodes["is_leaf"].sum()) for p in preds)
        per_leaf = 1
    return {"nodes": nodes, "leaves": leaves, "params": 2 * (nodes - leaves) + per_leaf * leaves}


def rules_text(est, feature_names: list[str] | None = None, max_depth: int = 12) -> str:
    """A readable dump of a single tree's rules (scikit-learn ``export_text``); gbt: a summary."""
    if hasattr(est, "tree_"):
        from sklearn.tree import export_text

        return export_text(est, feature_names=feature_names, max_depth=max_depth, decimals=4)
    lines = [(f"histogram gradient boosting: {est.n_iter_} iterations of {est.n_trees_per_iteration_} trees "
              "(one per class; a class's logit is the baseline plus its trees' leaves)")]
    base = np.ravel(est._baseline_prediction)
    names = feature_names or [f"x{i}" for i in range(est.n_features_in_)]
    for c in range(est.n_trees_per_iteration_):
        root = est._predictors[0][c].nodes
        lines.append(f"class {est.classes_[c]}: baseline {float(base[c]):.4f}; first tree: {len(root)} nodes, root "
                     f"split {names[int(root[0]['feature_idx'])]} <= {float(root[0]['num_threshold']):.4g}")
    return "\n".join(lines) + "\n"


@contextlib.contextmanager
def _onnx_bool_attribute_fix():
    """skl2onnx 1.20 passes a Python bool in an int list for histogram-gradient-boosting leaves
    (``nodes_missing_value_tracks_true``), which onnx >= 1.20's ``make_attribute`` refuses
    ("Expected an int, got a boolean"); cast it to int while converting (docs/toolchain.md)."""
    from skl2onnx.common import tree_ensemble

    original = tree_ensemble.add_node

    def add_node(*a, nodes_missing_value_tracks_true=0, **kw):
        return original(*a, nodes_missing_value_tracks_true=int(nodes_missing_value_tracks_true), **kw)

    tree_ensemble.add_node = add_node
    try:
        yield
    finally:
        tree_ensemble.add_node = original


def to_onnx(est, input_shape: tuple, num_classes: int) -> bytes:
    """An ONNX graph ``x`` (N, *input_shape) float32 -> ``probabilities`` (N, C).

    skl2onnx converts the fitted model on flat inputs (a classifier without its ZipMap, so its
    probabilities stay a tensor); a Flatten in front takes the dataset's own layout, and an
    Identity behind names the output ``probabilities`` and declares its (N, C) shape (skl2onnx
    declares a multi-output regression tree's as (N, 1)). A classifier's label output is dropped.
    """
    import onnx
    from onnx import TensorProto, helper
    from skl2onnx import convert_sklearn
    from skl2onnx.common.data_types import FloatTensorType

    n_features = int(np.prod(input_shape))
    classifier = hasattr(est, "predict_proba")
    if classifier and list(est.classes_) != list(range(num_classes)):
        raise ValueError(f"the classifier knows classes {list(est.classes_)}, not 0..{num_classes - 1}")
    with _onnx_bool_attribute_fix():
        m = convert_sklearn(est, initial_types=[("x_flat", FloatTensorType([None, n_features]))],
                            target_opset={"": 17, "ai.onnx.ml": 3},
                            options={id(est): {"zipmap": False}} if classifier else None)
    g = m.graph
    raw = g.output[-1].name  # a classifier answers (label, probabilities), a regressor its values
    for node in g.node:  # free the name "probabilities" for the graph's own output
        node.output[:] = [o + "_raw" if o == "probabilities" else o for o in node.output]
    raw = raw + "_raw" if raw == "probabilities" else raw
    del g.output[:]
    del g.input[:]
    g.input.append(helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, *input_shape]))
    g.node.insert(0, helper.make_node("Flatten", ["x"], ["x_flat"], axis=1, name="flatten_input"))
    g.node.append(helper.make_node("Identity", [raw], ["probabilities"], name="probabilities"))
    g.output.append(helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, [None, num_classes]))
    onnx.checker.check_model(m)
    return m.SerializeToString()


def onnx_proba(path_or_bytes, x: np.ndarray, threads: int = 1, batch: int = 4096) -> np.ndarray:
    """ONNX Runtime's probabilities (N, C) for inputs ``x`` in the dataset's layout."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.log_severity_level = 3
    src = str(path_or_bytes) if not isinstance(path_or_bytes, bytes) else path_or_bytes
    sess = ort.InferenceSession(src, so, providers=["CPUExecutionProvider"])
    x = np.ascontiguousarray(x, np.float32)
    return np.concatenate([sess.run(["probabilities"], {"x": x[i:i + batch]})[0] for i in range(0, len(x), batch)])
