"""The public surface: names, errors tree, lazy imports."""

import subprocess
import sys

import pytest

import acteng
from acteng import errors


def test_all_is_pinned() -> None:
    assert acteng.__all__ == [
        "ActengError",
        "Activations",
        "ConfigError",
        "ContrastivePair",
        "DataError",
        "Detector",
        "EngineBusy",
        "Guard",
        "GuardResult",
        "IncompatibleVectorError",
        "InputTooLongError",
        "Layout",
        "LayoutError",
        "LibraryError",
        "METHODS",
        "MODES",
        "MissingExtraError",
        "Model",
        "ModelLoadError",
        "ModelRecipe",
        "Pairs",
        "RayBackend",
        "ReadItem",
        "RequestError",
        "SteeringSpec",
        "SteeringVector",
        "SweepResult",
        "TrainingError",
        "TuneResult",
        "UnsupportedError",
        "VectorFileError",
        "VectorLibrary",
        "__version__",
        "apply_steering",
        "bake",
        "calibrate_jointly",
        "diff_vector",
        "evaluate",
        "export_gguf",
        "extract",
        "generate",
        "guarded_generate",
        "import_gguf",
        "list_datasets",
        "load_detector",
        "load_model",
        "load_pairs",
        "load_vector",
        "monitor",
        "optimize_vector",
        "record_activations",
        "refusal_direction",
        "register_mode",
        "score_tokens",
        "steer",
        "sweep",
        "train_circuit_breaker",
        "train_detector",
        "train_rmu",
        "train_token_detector",
        "tune",
    ]
    for name in acteng.__all__:
        assert getattr(acteng, name) is not None


def test_every_error_class_is_exported_at_the_root() -> None:
    tree = [c for c in vars(errors).values() if isinstance(c, type) and issubclass(c, Exception)]
    assert {c.__name__ for c in tree} <= set(acteng.__all__)
    assert set(errors.__all__) == {c.__name__ for c in tree}


def test_subpackages_export_what_the_readme_teaches() -> None:
    import re
    from importlib import import_module
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
    for module, names in re.findall(r"^from (acteng[.\w]*) import ([\w, ]+)$", readme, re.M):
        exported = import_module(module).__all__
        missing = [n.strip() for n in names.split(",") if n.strip() not in exported]
        assert not missing, f"README imports {missing} from {module}, not in its __all__"


def test_unknown_attribute() -> None:
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        acteng.nope  # noqa: B018


def test_import_is_lazy() -> None:
    code = "import sys, acteng, acteng.cli; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


@pytest.mark.parametrize(
    ("cls", "builtin"),
    [
        (errors.ConfigError, ValueError),
        (errors.DataError, ValueError),
        (errors.VectorFileError, ValueError),
        (errors.IncompatibleVectorError, ValueError),
        (errors.InputTooLongError, ValueError),
        (errors.ModelLoadError, OSError),
        (errors.LayoutError, LookupError),
        (errors.UnsupportedError, NotImplementedError),
        (errors.MissingExtraError, ImportError),
        (errors.TrainingError, RuntimeError),
    ],
)
def test_error_tree(cls: type, builtin: type) -> None:
    assert issubclass(cls, errors.ActengError)
    assert issubclass(cls, builtin)


def test_missing_extra_names_install_line() -> None:
    err = errors.missing_extra("peft", "peft", purpose="loading a LoRA adapter")
    assert "pip install 'acteng[peft]'" in str(err)


def test_tune_and_sweep_take_in_python_what_their_cli_flags_take() -> None:
    import argparse
    import inspect

    from acteng.cli import build_parser

    commands = next(
        a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)
    ).choices
    # flags that choose where results go, how they print, or the model and backend objects
    outside = {"help", "out", "json", "plots", "model", "adapter", "dtype", "device"}
    outside |= {"backend", "ray_address", "run"}
    for name, fn, plot_only in (("tune", acteng.tune, set()), ("sweep", acteng.sweep, {"max_tax"})):
        flags = {a.dest for a in commands[name]._actions} - outside - plot_only
        assert flags <= set(inspect.signature(fn).parameters), name
        assert "test" in flags
