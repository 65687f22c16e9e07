"""The Runtime protocol every model runtime implements, and the options they take."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np
import numpy.typing as npt

from edge_agent.core.preprocess import Quantization

# Execution providers of ONNX Runtime in order of preference; those not installed are
# skipped, CPU always comes last.
DEFAULT_PROVIDERS: tuple[str, ...] = (
    "TensorrtExecutionProvider",
    "CUDAExecutionProvider",
    "OpenVINOExecutionProvider",
    "CPUExecutionProvider",
)


@dataclass(frozen=True, slots=True)
class RuntimeOptions:
    """How to run a model: intra-op threads, and ONNX providers in order of preference."""

    threads: int = 1
    providers: tuple[str, ...] = DEFAULT_PROVIDERS

    def __post_init__(self) -> None:
        if self.threads < 1:
            raise ValueError(f"threads must be >= 1, got {self.threads}")


class Runtime(Protocol):
    """A loaded model. ``run`` takes one preprocessed tensor (batch of 1) and returns the
    dequantized float outputs of that frame, flattened.

    ``run`` may be called from one thread at a time; open one runtime per thread.
    """

    @property
    def name(self) -> str:
        """Library name: ``onnxruntime`` or ``litert``."""
        ...

    @property
    def provider(self) -> str:
        """What actually executes: an ONNX execution provider, or ``cpu`` / a delegate."""
        ...

    @property
    def input_quantization(self) -> Quantization | None:
        """Scale and zero point of a quantized input; None for a float input."""
        ...

    def run(self, tensor: npt.NDArray[np.generic]) -> npt.NDArray[np.float32]: ...

    def close(self) -> None: ...


class ModelLoadError(Exception):
    """A model file cannot be loaded, or does not match the bundle's input spec."""
