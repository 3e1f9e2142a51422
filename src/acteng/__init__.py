"""acteng: activation engineering for transformers models.

Make steering vectors from contrastive examples, steer generation with them, and measure
what they do. The public names are loaded lazily so ``import acteng`` (and ``acteng
--help``) stays fast; torch and transformers load on first use.

>>> import acteng
>>> model = acteng.load_model()
>>> vector = acteng.extract(model, "sentiment", layers=[12])
>>> with acteng.steer(model, vector, coefficient=6.0):
...     print(acteng.generate(model, "Describe your morning."))
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# public name -> module that defines it
_EXPORTS = {
    "evaluate": "acteng.evaluation.measures",
    "sweep": "acteng.evaluation.sweep",
    "tune": "acteng.evaluation.tune",
    "SweepResult": "acteng.evaluation.sweep",
    "TuneResult": "acteng.evaluation.tune",
    "register_mode": "acteng.steering.modes",
    "ConfigError": "acteng.errors",
    "DataError": "acteng.errors",
    "EngineBusy": "acteng.errors",
    "IncompatibleVectorError": "acteng.errors",
    "InputTooLongError": "acteng.errors",
    "LayoutError": "acteng.errors",
    "LibraryError": "acteng.errors",
    "MissingExtraError": "acteng.errors",
    "ModelLoadError": "acteng.errors",
    "RequestError": "acteng.errors",
    "TrainingError": "acteng.errors",
    "UnsupportedError": "acteng.errors",
    "VectorFileError": "acteng.errors",
    "ActengError": "acteng.errors",
    "Activations": "acteng.activations",
    "ContrastivePair": "acteng.pairs",
    "Detector": "acteng.detectors",
    "Guard": "acteng.guard",
    "GuardResult": "acteng.guard",
    "Layout": "acteng.layouts",
    "METHODS": "acteng.methods",
    "MODES": "acteng.steering.modes",
    "Model": "acteng.models",
    "VectorLibrary": "acteng.library",
    "export_gguf": "acteng.gguf_vectors",
    "import_gguf": "acteng.gguf_vectors",
    "ModelRecipe": "acteng.models",
    "Pairs": "acteng.pairs",
    "RayBackend": "acteng.backends.ray",
    "ReadItem": "acteng.activations",
    "SteeringSpec": "acteng.steering.spec",
    "SteeringVector": "acteng.vectors",
    "apply_steering": "acteng.steering.apply",
    "bake": "acteng.baking",
    "extract": "acteng.extraction",
    "generate": "acteng.generation",
    "guarded_generate": "acteng.guard",
    "calibrate_jointly": "acteng.joint_calibration",
    "list_datasets": "acteng.pairs",
    "load_detector": "acteng.detectors",
    "load_model": "acteng.models",
    "load_vector": "acteng.library",
    "load_pairs": "acteng.pairs",
    "monitor": "acteng.monitoring",
    "optimize_vector": "acteng.optimization",
    "record_activations": "acteng.activations",
    "refusal_direction": "acteng.detectors",
    "score_tokens": "acteng.monitoring",
    "steer": "acteng.steering.apply",
    "train_detector": "acteng.detectors",
    "train_token_detector": "acteng.token_detector",
    "diff_vector": "acteng.training.diff",
    "train_rmu": "acteng.training.rmu",
    "train_circuit_breaker": "acteng.training.circuit_breaker",
}

__all__ = sorted([*_EXPORTS, "__version__"])

if TYPE_CHECKING:
    # `X as X` marks each name as a re-export for type checkers and linters.
    from acteng.activations import Activations as Activations
    from acteng.activations import ReadItem as ReadItem
    from acteng.activations import record_activations as record_activations
    from acteng.backends.ray import RayBackend as RayBackend
    from acteng.baking import bake as bake
    from acteng.detectors import Detector as Detector
    from acteng.detectors import load_detector as load_detector
    from acteng.detectors import refusal_direction as refusal_direction
    from acteng.detectors import train_detector as train_detector
    from acteng.errors import ActengError as ActengError
    from acteng.errors import ConfigError as ConfigError
    from acteng.errors import DataError as DataError
    from acteng.errors import EngineBusy as EngineBusy
    from acteng.errors import IncompatibleVectorError as IncompatibleVectorError
    from acteng.errors import InputTooLongError as InputTooLongError
    from acteng.errors import LayoutError as LayoutError
    from acteng.errors import LibraryError as LibraryError
    from acteng.errors import MissingExtraError as MissingExtraError
    from acteng.errors import ModelLoadError as ModelLoadError
    from acteng.errors import RequestError as RequestError
    from acteng.errors import TrainingError as TrainingError
    from acteng.errors import UnsupportedError as UnsupportedError
    from acteng.errors import VectorFileError as VectorFileError
    from acteng.evaluation.measures import evaluate as evaluate
    from acteng.evaluation.sweep import SweepResult as SweepResult
    from acteng.evaluation.sweep import sweep as sweep
    from acteng.evaluation.tune import TuneResult as TuneResult
    from acteng.evaluation.tune import tune as tune
    from acteng.extraction import extract as extract
    from acteng.generation import generate as generate
    from acteng.gguf_vectors import export_gguf as export_gguf
    from acteng.gguf_vectors import import_gguf as import_gguf
    from acteng.guard import Guard as Guard
    from acteng.guard import GuardResult as GuardResult
    from acteng.guard import guarded_generate as guarded_generate
    from acteng.joint_calibration import calibrate_jointly as calibrate_jointly
    from acteng.layouts import Layout as Layout
    from acteng.library import VectorLibrary as VectorLibrary
    from acteng.library import load_vector as load_vector
    from acteng.methods import METHODS as METHODS
    from acteng.models import Model as Model
    from acteng.models import ModelRecipe as ModelRecipe
    from acteng.models import load_model as load_model
    from acteng.monitoring import monitor as monitor
    from acteng.monitoring import score_tokens as score_tokens
    from acteng.optimization import optimize_vector as optimize_vector
    from acteng.pairs import ContrastivePair as ContrastivePair
    from acteng.pairs import Pairs as Pairs
    from acteng.pairs import list_datasets as list_datasets
    from acteng.pairs import load_pairs as load_pairs
    from acteng.steering.apply import apply_steering as apply_steering
    from acteng.steering.apply import steer as steer
    from acteng.steering.modes import MODES as MODES
    from acteng.steering.modes import register_mode as register_mode
    from acteng.steering.spec import SteeringSpec as SteeringSpec
    from acteng.token_detector import train_token_detector as train_token_detector
    from acteng.training.circuit_breaker import train_circuit_breaker as train_circuit_breaker
    from acteng.training.diff import diff_vector as diff_vector
    from acteng.training.rmu import train_rmu as train_rmu
    from acteng.vectors import SteeringVector as SteeringVector


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'acteng' has no attribute {name!r}")
    value = getattr(import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return __all__
