"""LiteRT backend (``ai-edge-litert``, the maintained successor of ``tflite-runtime``).

``tflite_runtime`` is used only when ``ai_edge_litert`` is not installed and it imports
cleanly: tflite-runtime 2.14 fails under NumPy 2 (``_ARRAY_API not found``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from edge_agent.core.preprocess import Quantization
from edge_agent.protocol.manifest import DType, InputSpec
from edge_agent.runtimes.base import ModelLoadError, RuntimeOptions
from edge_agent.runtimes.shapes import expected_shape

_NP_TYPES = {
    np.dtype(np.float32): DType.FLOAT32,
    np.dtype(np.uint8): DType.UINT8,
    np.dtype(np.int8): DType.INT8,
}


def _interpreter_class() -> Any:
    try:
        from ai_edge_litert.interpreter import Interpreter

        return Interpreter
    except ImportError:
        pass
    try:
        from tflite_runtime.interpreter import Interpreter as LegacyInterpreter
    except (ImportError, AttributeError) as e:
        raise ModelLoadError(
            "no LiteRT runtime installed: pip install 'edgefleet[tflite]' (ai-edge-litert)"
        ) from e
    return LegacyInterpreter


class LiteRtRuntime:
    """A ``.tflite`` model in a LiteRT ``Interpreter``.

    Quantized outputs are dequantized with the model's own scale and zero point, so
    callers always get float values.
    """

    def __init__(self, model_path: Path, spec: InputSpec, options: RuntimeOptions) -> None:
        interpreter_cls = _interpreter_class()
        try:
            self._interp = interpreter_cls(model_path=str(model_path), num_threads=options.threads)
            self._interp.allocate_tensors()
        except (ValueError, RuntimeError) as e:
            raise ModelLoadError(f"{model_path.name}: LiteRT cannot load it: {e}") from e
        inputs = self._interp.get_input_details()
        outputs = self._interp.get_output_details()
        if len(inputs) != 1 or not outputs:
            raise ModelLoadError(f"{model_path.name}: expected 1 input, model has {len(inputs)}")
        inp, out = inputs[0], outputs[0]
        dtype = _NP_TYPES.get(np.dtype(inp["dtype"]))
        if dtype is not spec.dtype:
            raise ModelLoadError(
                f"{model_path.name}: input type {np.dtype(inp['dtype']).name} does not match "
                f"manifest dtype {spec.dtype.value}"
            )
        want = expected_shape(spec)
        got = tuple(int(d) for d in inp["shape"])
        if got != want:
            raise ModelLoadError(
                f"{model_path.name}: input shape {list(got)} does not match manifest "
                f"{list(want)} ({spec.layout.value})"
            )
        self._in_index = int(inp["index"])
        self._out_index = int(out["index"])
        in_scale, in_zero = inp["quantization"]
        self._in_quant = (
            Quantization(float(in_scale), int(in_zero)) if dtype is not DType.FLOAT32 else None
        )
        if self._in_quant is not None and self._in_quant.scale == 0.0:
            raise ModelLoadError(f"{model_path.name}: quantized input without a scale")
        out_scale, out_zero = out["quantization"]
        self._out_quant = (float(out_scale), int(out_zero)) if out_scale else None
        # The default op resolver applies the XNNPACK delegate on CPU.
        self._provider = "xnnpack"

    @property
    def name(self) -> str:
        return "litert"

    @property
    def provider(self) -> str:
        return self._provider

    @property
    def input_quantization(self) -> Quantization | None:
        return self._in_quant

    def run(self, tensor: npt.NDArray[np.generic]) -> npt.NDArray[np.float32]:
        self._interp.set_tensor(self._in_index, tensor)
        self._interp.invoke()
        raw = np.asarray(self._interp.get_tensor(self._out_index)).reshape(-1)
        if self._out_quant is None:
            return np.asarray(raw, dtype=np.float32)
        scale, zero = self._out_quant
        return ((raw.astype(np.float32) - zero) * scale).astype(np.float32)

    def close(self) -> None:
        del self._interp
