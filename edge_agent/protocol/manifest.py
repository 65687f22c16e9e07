"""The model bundle manifest (``bundle.json``): schema and parsing.

A bundle is a directory holding ``bundle.json`` and exactly the files it lists. The schema
forbids unknown keys everywhere: a misspelt ``t_fial`` must be an error, not a silently
ignored threshold. ``docs/bundle-format.md`` documents the format; its JSON Schema is
generated from these models (``edge-agent schema``).
"""

from __future__ import annotations

import json
import re
from enum import Enum
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from edge_agent.protocol.errors import ManifestError

MANIFEST_NAME = "bundle.json"
FORMAT_VERSION = 1

# Features every reference profile describes, in wire order. The device computes the same
# ones per frame (edge_agent.core.features) and aggregates them per window.
FEATURE_NAMES: tuple[str, ...] = (
    "brightness",
    "contrast",
    "sharpness",
    "clipped",
    "r_mean",
    "g_mean",
    "b_mean",
    "p_defect",
)

_SAFE_PATH = re.compile(r"^(?!/)(?!.*(?:^|/)\.\.?(?:/|$))[A-Za-z0-9._/-]+$")
Sha256 = Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]


class _Strict(BaseModel):
    # NaN/Infinity are accepted by json.loads but are never valid here: an infinite std
    # would make every frame the same tensor.
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


class Runtime(str, Enum):
    ONNX = "onnx"
    TFLITE = "tflite"


class Layout(str, Enum):
    NCHW = "NCHW"
    NHWC = "NHWC"


class DType(str, Enum):
    FLOAT32 = "float32"
    UINT8 = "uint8"
    INT8 = "int8"


class ColorOrder(str, Enum):
    RGB = "RGB"
    BGR = "BGR"


class ResizeMode(str, Enum):
    STRETCH = "stretch"
    LETTERBOX = "letterbox"
    CENTER_CROP = "center-crop"


class Activation(str, Enum):
    SOFTMAX = "softmax"
    SIGMOID = "sigmoid"
    NONE = "none"


class FileEntry(_Strict):
    length: Annotated[int, Field(ge=0)]
    sha256: Sha256


class Normalization(_Strict):
    """Float input the model was trained on: ``x = (pixel - mean) / std`` per channel.

    Pixels are 0..255 in the manifest's color order. For quantized inputs (uint8/int8)
    the model's own scale and zero point then map ``x`` to integers.
    """

    mean: tuple[float, float, float] = (0.0, 0.0, 0.0)
    std: tuple[float, float, float] = (255.0, 255.0, 255.0)

    @model_validator(mode="after")
    def _std_positive(self) -> Normalization:
        if any(s <= 0 for s in self.std):
            raise ValueError("std values must be > 0")
        return self


class RegionOfInterest(_Strict):
    """Crop applied before resizing, as fractions of the frame's width and height."""

    x: Annotated[float, Field(ge=0.0, lt=1.0)]
    y: Annotated[float, Field(ge=0.0, lt=1.0)]
    width: Annotated[float, Field(gt=0.0, le=1.0)]
    height: Annotated[float, Field(gt=0.0, le=1.0)]

    @model_validator(mode="after")
    def _inside(self) -> RegionOfInterest:
        if self.x + self.width > 1.0 + 1e-9 or self.y + self.height > 1.0 + 1e-9:
            raise ValueError("region of interest extends past the frame")
        return self


class InputSpec(_Strict):
    width: Annotated[int, Field(ge=1, le=8192)]
    height: Annotated[int, Field(ge=1, le=8192)]
    layout: Layout
    dtype: DType
    color: ColorOrder = ColorOrder.RGB
    resize: ResizeMode = ResizeMode.STRETCH
    pad_value: Annotated[int, Field(ge=0, le=255)] = 0
    normalization: Normalization = Normalization()
    roi: RegionOfInterest | None = None


class OutputSpec(_Strict):
    labels: Annotated[list[str], Field(min_length=1)]
    defect_label: str
    activation: Activation

    @model_validator(mode="after")
    def _defect_is_a_label(self) -> OutputSpec:
        if self.defect_label not in self.labels:
            raise ValueError(f"defect_label {self.defect_label!r} is not one of labels")
        if len(set(self.labels)) != len(self.labels):
            raise ValueError("labels must be unique")
        if self.activation is Activation.SIGMOID and len(self.labels) != 2:
            raise ValueError("sigmoid activation takes exactly two labels (negative, defect)")
        return self

    @property
    def defect_index(self) -> int:
        return self.labels.index(self.defect_label)


class Decision(_Strict):
    """``fail`` when p >= t_fail; ``uncertain`` when t_uncertain <= p < t_fail; else ``pass``."""

    t_fail: Annotated[float, Field(gt=0.0, le=1.0)]
    t_uncertain: Annotated[float, Field(ge=0.0, le=1.0)]

    @model_validator(mode="after")
    def _ordered(self) -> Decision:
        if self.t_uncertain > self.t_fail:
            raise ValueError("t_uncertain must be <= t_fail")
        return self


class FeatureReference(_Strict):
    """Reference distribution of one per-frame feature, from the training data.

    ``counts`` has ``len(edges) + 1`` entries: an underflow bin, the bins between the
    edges, and an overflow bin, so the same edges work for any stream.
    """

    edges: Annotated[list[float], Field(min_length=2)]
    counts: list[int]
    mean: float
    std: Annotated[float, Field(ge=0.0)]
    window_frames: Annotated[int, Field(ge=1)]
    window_mean_std: Annotated[float, Field(ge=0.0)]

    @model_validator(mode="after")
    def _shape(self) -> FeatureReference:
        if any(b <= a for a, b in zip(self.edges, self.edges[1:], strict=False)):
            raise ValueError("edges must be strictly increasing")
        if len(self.counts) != len(self.edges) + 1:
            raise ValueError("counts must have len(edges) + 1 entries (under/overflow bins)")
        if any(c < 0 for c in self.counts):
            raise ValueError("counts must be >= 0")
        return self


class ReferenceProfile(_Strict):
    frames: Annotated[int, Field(ge=1)]
    features: dict[str, FeatureReference]

    @model_validator(mode="after")
    def _all_features(self) -> ReferenceProfile:
        missing = [f for f in FEATURE_NAMES if f not in self.features]
        unknown = [f for f in self.features if f not in FEATURE_NAMES]
        if missing:
            raise ValueError(f"reference profile lacks features: {', '.join(missing)}")
        if unknown:
            raise ValueError(f"unknown features in reference profile: {', '.join(unknown)}")
        return self


class GoldenSample(_Strict):
    file: str
    p_defect: Annotated[float, Field(ge=0.0, le=1.0)]
    tolerance: Annotated[float, Field(gt=0.0, le=1.0)] = 0.05


class BundleManifest(_Strict):
    format: Literal[1] = 1
    name: Annotated[str, Field(pattern=r"^[a-z0-9][a-z0-9._-]{0,63}$")]
    version: Annotated[str, Field(pattern=r"^[0-9A-Za-z][0-9A-Za-z.+-]{0,31}$")]
    runtime: Runtime
    model: str
    description: str = ""
    files: dict[str, FileEntry]
    input: InputSpec
    output: OutputSpec
    decision: Decision
    reference: ReferenceProfile | None = None
    golden: list[GoldenSample] = []

    @model_validator(mode="after")
    def _files_consistent(self) -> BundleManifest:
        for path in self.files:
            if not _SAFE_PATH.match(path) or path == MANIFEST_NAME:
                raise ValueError(f"unsafe or reserved file path {path!r}")
        if self.model not in self.files:
            raise ValueError(f"model file {self.model!r} is not listed in files")
        for sample in self.golden:
            if sample.file not in self.files:
                raise ValueError(f"golden sample {sample.file!r} is not listed in files")
        return self

    @property
    def id(self) -> str:
        return f"{self.name}@{self.version}"


def parse_manifest(data: bytes | str, source: str = MANIFEST_NAME) -> BundleManifest:
    """Parse and validate manifest JSON.

    Raises:
        ManifestError: naming ``source`` and every bad key, for invalid JSON or schema.
    """
    try:
        raw = json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ManifestError(f"{source}: not valid JSON: {e}") from e
    try:
        return BundleManifest.model_validate(raw)
    except ValidationError as e:
        raise ManifestError(f"{source}: {_describe(e)}") from e


def dump_manifest(manifest: BundleManifest) -> bytes:
    """Canonical JSON bytes for a manifest (sorted keys, two-space indent, final newline)."""
    raw = manifest.model_dump(mode="json", exclude_defaults=False)
    return (json.dumps(raw, indent=2, sort_keys=True) + "\n").encode()


def manifest_json_schema() -> dict[str, object]:
    return BundleManifest.model_json_schema(mode="validation")


def _describe(error: ValidationError) -> str:
    parts = []
    for item in error.errors():
        where = ".".join(str(p) for p in item["loc"]) or "(top level)"
        if item["type"] == "extra_forbidden":
            parts.append(f"unknown key {where!r}")
        elif item["type"] == "missing":
            parts.append(f"missing key {where!r}")
        else:
            parts.append(f"{where}: {item['msg']}")
    return "; ".join(parts)
