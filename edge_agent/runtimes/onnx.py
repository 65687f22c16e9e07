"""ONNX Runtime backend."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import numpy.typing as npt
import onnxruntime as ort

from edge_agent.core.preprocess import Quantization
from edge_agent.protocol.manifest import DType, InputSpec
from edge_agent.runtimes.base import ModelLoadError, RuntimeOptions
from edge_agent.runtimes.shapes import expected_shape

# onnxruntime raises its own exception classes (not RuntimeError) for a corrupt file, a bad
# graph or a failing provider; every one of them means "this model cannot be loaded".
_ORT_LOAD_ERRORS: tuple[type[Exception], ...] = (
    *(
        error
        for name in (
            "Fail",
            "InvalidArgument",
            "NoSuchFile",
            "NoModel",
            "EngineError",
            "RuntimeException",
            "InvalidProtobuf",
            "ModelLoaded",
            "NotImplemented",
            "InvalidGraph",
            "EPFail",
        )
        if isinstance(error := getattr(ort.capi.onnxruntime_pybind11_state, name, None), type)
    ),
    RuntimeError,
    ValueError,
)

_ORT_TYPES = {
    "tensor(float)": DType.FLOAT32,
    "tensor(uint8)": DType.UINT8,
    "tensor(int8)": DType.INT8,
}


class OnnxRuntime:
    """An ONNX model in an ``onnxruntime.InferenceSession``.

    Providers are taken from ``options.providers`` in order, keeping those this
    onnxruntime build has; ``provider`` reports the one the session actually uses.
    """

    def __init__(self, model_path: Path, spec: InputSpec, options: RuntimeOptions) -> None:
        available = set(ort.get_available_providers())
        providers = [p for p in options.providers if p in available] or ["CPUExecutionProvider"]
        so = ort.SessionOptions()
        so.intra_op_num_threads = options.threads
        so.inter_op_num_threads = 1
        so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        # Spinning worker threads burn a core while idle; on a 2-core device that core is
        # needed by the decode stage.
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
        so.log_severity_level = 3
        try:
            self._session = ort.InferenceSession(str(model_path), so, providers=providers)
        except _ORT_LOAD_ERRORS as e:
            raise ModelLoadError(f"{model_path.name}: onnxruntime cannot load it: {e}") from e
        inputs = self._session.get_inputs()
        if len(inputs) != 1:
            raise ModelLoadError(f"{model_path.name}: expected 1 input, model has {len(inputs)}")
        inp = inputs[0]
        dtype = _ORT_TYPES.get(inp.type)
        if dtype is not spec.dtype:
            raise ModelLoadError(
                f"{model_path.name}: input type {inp.type} does not match manifest dtype "
                f"{spec.dtype.value}"
            )
        want = expected_shape(spec)
        got = tuple(d if isinstance(d, int) else -1 for d in inp.shape)
        if len(got) != 4 or any(g not in (w, -1) for g, w in zip(got, want, strict=True)):
            raise ModelLoadError(
                f"{model_path.name}: input shape {list(inp.shape)} does not match manifest "
                f"{list(want)} ({spec.layout.value})"
            )
        self._input_name = inp.name
        self._output_names = [o.name for o in self._session.get_outputs()[:1]]
        self._provider = str(self._session.get_providers()[0])
        self._quant = Quantization(1.0, 0) if dtype is not DType.FLOAT32 else None

    @property
    def name(self) -> str:
        return "onnxruntime"

    @property
    def provider(self) -> str:
        return self._provider

    @property
    def input_quantization(self) -> Quantization | None:
        # ONNX graphs carry no input quantization: an integer input takes the normalized
        # values as they are (scale 1, zero point 0). QDQ-quantized models take floats.
        return self._quant

    def run(self, tensor: npt.NDArray[np.generic]) -> npt.NDArray[np.float32]:
        out = self._session.run(self._output_names, {self._input_name: tensor})[0]
        return np.asarray(out, dtype=np.float32).reshape(-1)

    def close(self) -> None:
        del self._session
