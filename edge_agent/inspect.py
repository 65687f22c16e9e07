"""One inspection, start to end: image -> preprocess -> runtime -> verdict.

``Inspector`` binds a verified bundle to a loaded runtime. It is the sequential path
used by ``edge-agent infer``, the golden-sample self-test and the pipeline's stages.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass

import numpy as np

from edge_agent.bundle import Bundle, load_bundle
from edge_agent.core.decode import DEFAULT_MAX_PIXELS, ImageError, decode_image, read_image_file
from edge_agent.core.preprocess import Image, Preprocessor, Tensor
from edge_agent.core.verdict import Verdict, error_verdict, judge
from edge_agent.protocol.manifest import Decision
from edge_agent.runtimes import Runtime, RuntimeOptions, open_runtime


@dataclass(frozen=True, slots=True)
class GoldenResult:
    file: str
    expected: float
    got: float
    ok: bool


class Inspector:
    """A bundle's model, loaded and ready: one runtime, used from one thread at a time."""

    def __init__(
        self,
        bundle: Bundle,
        runtime: Runtime,
        max_pixels: int = DEFAULT_MAX_PIXELS,
        decision: Decision | None = None,
    ) -> None:
        self.bundle = bundle
        self.manifest = bundle.manifest
        # A device may override the bundle's thresholds (config [thresholds]).
        self.decision = decision or bundle.manifest.decision
        self.runtime = runtime
        self.preprocessor = Preprocessor(self.manifest.input, runtime.input_quantization)
        self.max_pixels = max_pixels
        self.input_size = (self.manifest.input.width, self.manifest.input.height)

    @classmethod
    def open(cls, path: str | os.PathLike[str], options: RuntimeOptions | None = None) -> Inspector:
        """Load and verify the bundle at ``path`` and its model.

        Raises:
            BundleError: bad bundle (names the file or key).
            ModelLoadError: the model cannot be loaded or does not fit the manifest.
        """
        bundle = load_bundle(path)
        m = bundle.manifest
        runtime = open_runtime(m.runtime, bundle.model_path, m.input, options or RuntimeOptions())
        return cls(bundle, runtime)

    def decode(self, data: bytes) -> Image:
        """Decode encoded image bytes, at reduced scale where the model input is small.

        Raises:
            ImageError: the bytes are not a usable image (the reason says why).
        """
        return decode_image(data, max_pixels=self.max_pixels, reduce_to=self._reduce_to())

    def _reduce_to(self) -> tuple[int, int] | None:
        # A region of interest needs its own pixels at full model resolution, so
        # reduced decoding must keep the crop at least as large as the model input.
        roi = self.manifest.input.roi
        if roi is None:
            return self.input_size
        return (
            int(np.ceil(self.input_size[0] / roi.width)),
            int(np.ceil(self.input_size[1] / roi.height)),
        )

    def run_tensor(self, tensor: Tensor, frame_id: int, started: float) -> Verdict:
        outputs = self.runtime.run(tensor)
        latency = (time.perf_counter() - started) * 1000.0
        return judge(outputs, self.manifest.output, self.decision, frame_id, latency)

    def inspect_image(self, image: Image, frame_id: int = 0) -> Verdict:
        started = time.perf_counter()
        return self.run_tensor(self.preprocessor(image), frame_id, started)

    def inspect_bytes(self, data: bytes, frame_id: int = 0) -> Verdict:
        """Decode and inspect; an unusable image gives an ``error`` verdict with its reason."""
        started = time.perf_counter()
        try:
            image = self.decode(data)
        except ImageError as e:
            return error_verdict(frame_id, e.reason, (time.perf_counter() - started) * 1000.0)
        return self.run_tensor(self.preprocessor(image), frame_id, started)

    def inspect_path(self, path: str | os.PathLike[str], frame_id: int = 0) -> Verdict:
        started = time.perf_counter()
        try:
            image = read_image_file(path, max_pixels=self.max_pixels, reduce_to=self._reduce_to())
        except ImageError as e:
            return error_verdict(frame_id, e.reason, (time.perf_counter() - started) * 1000.0)
        return self.run_tensor(self.preprocessor(image), frame_id, started)

    def self_test(self) -> list[GoldenResult]:
        """Run the bundle's golden samples; each must match its expected P(defect)."""
        results = []
        for sample in self.manifest.golden:
            verdict = self.inspect_path(self.bundle.file(sample.file))
            got = verdict.p_defect
            ok = bool(np.isfinite(got)) and abs(got - sample.p_defect) <= sample.tolerance
            results.append(GoldenResult(sample.file, sample.p_defect, got, ok))
        return results

    def close(self) -> None:
        self.runtime.close()
