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
        "ContrastivePair",
        "Detector",
        "Guard",
        "GuardResult",
        "Layout",
        "METHODS",
        "MODES",
        "Model",
        "ModelRecipe",
        "Pairs",
        "RayBackend",
        "ReadItem",
        "SteeringSpec",
        "SteeringVector",
        "VectorLibrary",
        "__version__",
        "apply_steering",
        "bake",
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
        "score_tokens",
        "steer",
        "train_detector",
    ]
    for name in acteng.__all__:
        assert getattr(acteng, name) is not None


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
    ],
)
def test_error_tree(cls: type, builtin: type) -> None:
    assert issubclass(cls, errors.ActengError)
    assert issubclass(cls, builtin)


def test_missing_extra_names_install_line() -> None:
    err = errors.missing_extra("peft", "peft", purpose="loading a LoRA adapter")
    assert "pip install 'acteng[peft]'" in str(err)
