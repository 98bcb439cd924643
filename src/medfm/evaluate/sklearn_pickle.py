"""``medfm probe import``: a scikit-learn linear model in a pickle (FMCIB's ``model.pkl``) → a medfm probe.

A pickle can run any code when it is loaded. This module reads one only through an allow-list of globals (the
scikit-learn and numpy names that a ``LogisticRegression``, a ``StandardScaler`` and a ``Pipeline`` of them need)
and in two passes: first every global the pickle names is checked against the list while nothing real is built
(each allowed name stands for an inert stub), so a pickle that names anything else is refused, naming that global,
before any of its code runs; only then is it loaded for real, again through the same allow-list
(``pickle.Unpickler.find_class``). The loaded objects' methods are never called: their fitted arrays are read,
checked and written as a medfm probe (``.npz`` + ``.json``, no pickle), which ``medfm predict`` applies.
"""

from __future__ import annotations

import hashlib
import importlib
import io
import os
import pickle
import warnings
from pathlib import Path

import numpy as np

from medfm.errors import CheckpointError

# (module, name) as a pickle names it → (module, name) to import; old scikit-learn and numpy 1.x paths included
_ALLOWED = {
    ("sklearn.linear_model._logistic", "LogisticRegression"): ("sklearn.linear_model", "LogisticRegression"),
    ("sklearn.linear_model.logistic", "LogisticRegression"): ("sklearn.linear_model", "LogisticRegression"),
    ("sklearn.preprocessing._data", "StandardScaler"): ("sklearn.preprocessing", "StandardScaler"),
    ("sklearn.preprocessing.data", "StandardScaler"): ("sklearn.preprocessing", "StandardScaler"),
    ("sklearn.pipeline", "Pipeline"): ("sklearn.pipeline", "Pipeline"),
    ("numpy", "ndarray"): ("numpy", "ndarray"),
    ("numpy", "dtype"): ("numpy", "dtype"),
    ("numpy.core.multiarray", "_reconstruct"): ("numpy._core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"): ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"): ("numpy._core.multiarray", "scalar"),
    ("numpy._core.multiarray", "scalar"): ("numpy._core.multiarray", "scalar"),
    ("numpy.core.numeric", "_frombuffer"): ("numpy._core.numeric", "_frombuffer"),
    ("numpy._core.numeric", "_frombuffer"): ("numpy._core.numeric", "_frombuffer"),
    ("_codecs", "encode"): ("_codecs", "encode"),  # how protocol 2 writes bytes
}
SUPPORTED = "a LogisticRegression, or a Pipeline of StandardScaler steps and a LogisticRegression"


def _refuse(path: str, module: str, name: str) -> CheckpointError:
    return CheckpointError(
        f"{path}: refused to unpickle global {module}.{name}; only {SUPPORTED} (and the numpy arrays they hold) "
        "can be imported, and nothing of the file was run"
    )


class _Inert:
    """What every allowed global stands for in the checking pass: takes any arguments and state, does nothing."""

    def __new__(cls, *args: object, **kwargs: object) -> _Inert:  # noqa: D102
        return object.__new__(cls)

    def __init__(self, *args: object, **kwargs: object) -> None:
        pass

    def __call__(self, *args: object, **kwargs: object) -> _Inert:
        return _Inert()

    def __setstate__(self, state: object) -> None:
        pass


class _CheckingUnpickler(pickle.Unpickler):
    """Walks the whole pickle with stubs for allowed globals; refuses the first global off the list."""

    def __init__(self, data: bytes, path: str) -> None:
        super().__init__(io.BytesIO(data))
        self.path = path

    def find_class(self, module: str, name: str) -> type:  # noqa: D102
        if (module, name) not in _ALLOWED:
            raise _refuse(self.path, module, name)
        return type(f"_Inert_{name}", (_Inert,), {})

    def persistent_load(self, pid: object) -> object:  # noqa: D102
        raise CheckpointError(f"{self.path}: refused a pickle with external (persistent) references; nothing was run")


class _RestrictedUnpickler(_CheckingUnpickler):
    """The real load, through the same allow-list."""

    def find_class(self, module: str, name: str) -> type:  # noqa: D102
        if (module, name) not in _ALLOWED:
            raise _refuse(self.path, module, name)
        target_module, target_name = _ALLOWED[(module, name)]
        return getattr(importlib.import_module(target_module), target_name)


def load_sklearn_pickle(path: str | os.PathLike[str]) -> object:
    """Unpickle a scikit-learn linear model through the allow-list; anything else is refused before it runs."""
    path = str(path)
    try:
        data = Path(path).read_bytes()
    except OSError as err:
        raise CheckpointError(f"{path}: cannot read ({err.strerror or err})") from None
    if data[:2] in (b"\x1f\x8b", b"BZ", b"\xfd7") or data[:4] == b"\x28\xb5\x2f\xfd":
        raise CheckpointError(f"{path}: a compressed file (joblib with compression?); give the plain pickle")
    for unpickler in (_CheckingUnpickler, _RestrictedUnpickler):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # scikit-learn's warning that the pickle is from another version
                obj = unpickler(data, path).load()
        except CheckpointError:
            raise
        except Exception as err:  # a damaged or foreign file: a user error, never a traceback
            raise CheckpointError(
                f"{path}: not a readable pickle of {SUPPORTED} ({type(err).__name__}: {err})"
            ) from None
    return obj


def _array(value: object, what: str, path: str) -> np.ndarray:
    if not isinstance(value, np.ndarray) or value.dtype.kind not in "fiu":
        raise CheckpointError(f"{path}: {what} is not a numeric array ({type(value).__name__})")
    array = value.astype(np.float64)
    if not np.isfinite(array).all():
        raise CheckpointError(f"{path}: {what} holds NaN or infinite values")
    return array


def linear_parts(obj: object, path: str = "<pickle>") -> dict[str, object]:
    """The fitted arrays of a LogisticRegression (after any StandardScaler steps) as one standardise → linear map."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import Pipeline
    from sklearn.preprocessing import StandardScaler

    steps = [step for _, step in vars(obj).get("steps", [])] if isinstance(obj, Pipeline) else [obj]
    steps = [s for s in steps if s is not None and not (isinstance(s, str) and s == "passthrough")]
    names = [type(s).__name__ for s in steps]
    if (
        not steps
        or not isinstance(steps[-1], LogisticRegression)
        or not all(isinstance(s, StandardScaler) for s in steps[:-1])
    ):
        raise CheckpointError(f"{path}: holds {' → '.join(names) or 'nothing'}; medfm imports {SUPPORTED}")
    model = vars(steps[-1])
    if "coef_" not in model:
        raise CheckpointError(f"{path}: the LogisticRegression was never fitted (it has no coef_)")
    coef = np.atleast_2d(_array(model["coef_"], "coef_", path))
    intercept = np.atleast_1d(_array(np.asarray(model.get("intercept_", 0.0), dtype=np.float64), "intercept_", path))
    classes = np.asarray(model.get("classes_"))
    d = coef.shape[1]
    expected_rows = 1 if len(classes) == 2 else len(classes)
    if len(classes) < 2 or coef.shape[0] != expected_rows or intercept.shape != (expected_rows,):
        raise CheckpointError(
            f"{path}: inconsistent LogisticRegression: coef_ {coef.shape}, intercept_ {intercept.shape}, "
            f"{len(classes)} classes"
        )
    if len(classes) > 2:
        multi = model.get("multi_class", "auto")
        if multi == "ovr" or (multi == "auto" and model.get("solver") == "liblinear"):
            raise CheckpointError(
                f"{path}: a one-vs-rest multi-class LogisticRegression; medfm's probe is multinomial (softmax)"
            )
    # compose the scalers: x → (x − mean) / scale, one after the other, as one mean and scale
    mean, scale = np.zeros(d), np.ones(d)
    for k, scaler in enumerate(steps[:-1]):
        s = vars(scaler)
        step_mean = _array(s["mean_"], f"StandardScaler {k} mean_", path) if s.get("with_mean", True) else 0.0
        step_scale = _array(s["scale_"], f"StandardScaler {k} scale_", path) if s.get("with_std", True) else 1.0
        if np.any(np.asarray(step_scale) <= 0):
            raise CheckpointError(f"{path}: StandardScaler {k} has a scale of zero or below")
        mean = mean + np.asarray(step_mean) * scale
        scale = scale * np.asarray(step_scale)
    if mean.shape != (d,) or scale.shape != (d,):
        raise CheckpointError(f"{path}: the scaler has {mean.shape} features, the LogisticRegression {d}")
    # coef acts on standardised features; medfm's probe stores the same: decision = ((x − mean) / scale) · coefᵀ + b
    names_in = vars(steps[0]).get("feature_names_in_")
    return {
        "mean": mean,
        "scale": scale,
        "coef": coef,
        "intercept": intercept,
        "classes": classes,
        "C": float(model.get("C", float("nan"))),
        "feature_names": [str(n) for n in names_in] if isinstance(names_in, np.ndarray) else None,
        "estimator": " → ".join(names),
        "sklearn_version": vars(steps[-1]).get("_sklearn_version"),
    }


def import_sklearn_probe(
    pickle_path: str | os.PathLike[str], out: str | os.PathLike[str], feature_prefix: str = "pred_"
) -> Path:
    """Convert a pickled scikit-learn linear model into a medfm probe (``out`` .json + .npz); returns the .json.

    The feature columns are the model's own names when it was fitted on a DataFrame, else ``feature_prefix`` + index
    (FMCIB's ``pred_0 …``).
    """
    from medfm.evaluate.linear import LinearProbe

    path = str(pickle_path)
    parts = linear_parts(load_sklearn_pickle(path), path)
    probe = LinearProbe.from_arrays(
        parts["mean"], parts["scale"], parts["coef"], parts["intercept"], parts["classes"], parts["C"]
    )
    columns = parts["feature_names"] or [f"{feature_prefix}{i}" for i in range(parts["coef"].shape[1])]
    source = {
        "file": os.path.abspath(path),
        "sha256": hashlib.sha256(Path(path).read_bytes()).hexdigest(),
        "estimator": parts["estimator"],
        "sklearn_version": parts["sklearn_version"],
    }
    target = Path(out)
    return probe.save(target.with_suffix("") if target.suffix == ".json" else target, columns, imported_from=source)
