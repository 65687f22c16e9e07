"""Model runtimes behind one protocol. Backends are imported only when opened, so a
LiteRT device never loads onnxruntime and vice versa."""

from __future__ import annotations

from pathlib import Path

from edge_agent.protocol.manifest import InputSpec
from edge_agent.protocol.manifest import Runtime as RuntimeKind
from edge_agent.runtimes.base import DEFAULT_PROVIDERS, ModelLoadError, Runtime, RuntimeOptions

__all__ = ["DEFAULT_PROVIDERS", "ModelLoadError", "Runtime", "RuntimeOptions", "open_runtime"]


def open_runtime(
    kind: RuntimeKind, model_path: Path, spec: InputSpec, options: RuntimeOptions
) -> Runtime:
    """Load ``model_path`` with the backend for ``kind``.

    Raises:
        ModelLoadError: the backend is not installed, or the model cannot be loaded or
            does not match ``spec``.
    """
    if kind is RuntimeKind.ONNX:
        from edge_agent.runtimes.onnx import OnnxRuntime

        return OnnxRuntime(model_path, spec, options)
    from edge_agent.runtimes.litert import LiteRtRuntime

    return LiteRtRuntime(model_path, spec, options)
