"""Tests for edge_agent.protocol.manifest: the bundle.json schema and its error messages."""

from __future__ import annotations

import copy
import hashlib
import json
import subprocess
import sys
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest

from edge_agent.core.features import build_reference_profile
from edge_agent.protocol.errors import BundleError, ManifestError
from edge_agent.protocol.manifest import (
    FEATURE_NAMES,
    MANIFEST_NAME,
    BundleManifest,
    dump_manifest,
    parse_manifest,
)

Raw = dict[str, Any]
Mutation = Callable[[Raw], None]


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.fixture(scope="module")
def reference() -> Raw:
    rows = np.random.default_rng(7).uniform(0.0, 1.0, size=(40, len(FEATURE_NAMES)))
    rows[:, :7] *= 200.0
    profile = build_reference_profile(rows, window_frames=10)
    raw: Raw = profile.model_dump(mode="json")
    return raw


@pytest.fixture
def valid(reference: Raw) -> Raw:
    """A complete manifest: every key spelled out, so a round trip must return it as is."""
    return {
        "format": 1,
        "name": "reference",
        "version": "1.2.0",
        "runtime": "onnx",
        "model": "model.onnx",
        "description": "scratch detector",
        "files": {
            "model.onnx": {"length": 5, "sha256": _sha(b"model")},
            "golden/ok.png": {"length": 2, "sha256": _sha(b"ok")},
            "golden/defect.png": {"length": 6, "sha256": _sha(b"defect")},
        },
        "input": {
            "width": 224,
            "height": 160,
            "layout": "NCHW",
            "dtype": "float32",
            "color": "RGB",
            "resize": "letterbox",
            "pad_value": 114,
            "normalization": {"mean": [123.675, 116.28, 103.53], "std": [58.395, 57.12, 57.375]},
            "roi": {"x": 0.1, "y": 0.2, "width": 0.8, "height": 0.5},
        },
        "output": {"labels": ["ok", "defect"], "defect_label": "defect", "activation": "softmax"},
        "decision": {"t_fail": 0.7, "t_uncertain": 0.4},
        "reference": copy.deepcopy(reference),
        "golden": [
            {"file": "golden/ok.png", "p_defect": 0.02, "tolerance": 0.05},
            {"file": "golden/defect.png", "p_defect": 0.97, "tolerance": 0.1},
        ],
    }


def _parse(raw: Raw) -> BundleManifest:
    return parse_manifest(json.dumps(raw))


# --- table of named bad manifests -------------------------------------------------------


def _walk(raw: Raw, path: tuple[str | int, ...]) -> Any:
    node: Any = raw
    for key in path:
        node = node[key]
    return node


def _set(path: tuple[str | int, ...], value: object) -> Mutation:
    def mutate(raw: Raw) -> None:
        _walk(raw, path[:-1])[path[-1]] = value

    return mutate


def _del(path: tuple[str | int, ...]) -> Mutation:
    def mutate(raw: Raw) -> None:
        del _walk(raw, path[:-1])[path[-1]]

    return mutate


def _add_file(path: str) -> Mutation:
    return _set(("files", path), {"length": 1, "sha256": _sha(b"x")})


def _all(*mutations: Mutation) -> Mutation:
    def mutate(raw: Raw) -> None:
        for m in mutations:
            m(raw)

    return mutate


def _copy_feature(src: str, dst: str) -> Mutation:
    def mutate(raw: Raw) -> None:
        features = raw["reference"]["features"]
        features[dst] = copy.deepcopy(features[src])

    return mutate


def _edit_feature(name: str, key: str, edit: Callable[[Any], Any]) -> Mutation:
    def mutate(raw: Raw) -> None:
        feature = raw["reference"]["features"][name]
        feature[key] = edit(feature[key])

    return mutate


_FILES = ("files",)
_MODEL_SHA = ("files", "model.onnx", "sha256")
_INPUT = ("input",)
_NORM = ("input", "normalization")
_ROI = ("input", "roi")
_OUTPUT = ("output",)
_DECISION = ("decision",)
_FEATURES = ("reference", "features")

# (id, mutation, text the error message must contain)
BAD_MANIFESTS: list[tuple[str, Mutation, str]] = [
    # unknown keys, at every level
    ("unknown-top-level-key", _set(("modle",), "model.onnx"), "'modle'"),
    ("unknown-input-key", _set((*_INPUT, "layot"), "NCHW"), "'input.layot'"),
    ("unknown-decision-key", _set((*_DECISION, "t_fial"), 0.9), "'decision.t_fial'"),
    ("unknown-output-key", _set((*_OUTPUT, "lables"), ["a"]), "'output.lables'"),
    ("unknown-normalization-key", _set((*_NORM, "stdev"), [1, 1, 1]), "normalization.stdev"),
    ("unknown-roi-key", _set((*_ROI, "w"), 0.5), "'input.roi.w'"),
    ("unknown-file-entry-key", _set(("files", "model.onnx", "md5"), "00"), "md5"),
    ("unknown-feature-key", _set((*_FEATURES, "contrast", "median"), 3.0), "median"),
    ("unknown-reference-key", _set(("reference", "source"), "lab"), "'reference.source'"),
    ("unknown-golden-key", _set(("golden", 1, "p"), 0.5), "'golden.1.p'"),
    # missing required keys
    ("missing-name", _del(("name",)), "missing key 'name'"),
    ("missing-runtime", _del(("runtime",)), "missing key 'runtime'"),
    ("missing-model", _del(("model",)), "missing key 'model'"),
    ("missing-files", _del(_FILES), "missing key 'files'"),
    ("missing-input", _del(_INPUT), "missing key 'input'"),
    ("missing-decision", _del(_DECISION), "missing key 'decision'"),
    ("missing-t-fail", _del((*_DECISION, "t_fail")), "missing key 'decision.t_fail'"),
    ("missing-input-layout", _del((*_INPUT, "layout")), "missing key 'input.layout'"),
    ("missing-defect-label", _del((*_OUTPUT, "defect_label")), "output.defect_label"),
    ("missing-sha256", _del(_MODEL_SHA), "sha256"),
    ("missing-golden-file", _del(("golden", 0, "file")), "golden.0.file"),
    ("missing-feature-edges", _del((*_FEATURES, "sharpness", "edges")), "sharpness.edges"),
    # decision thresholds
    ("t-uncertain-above-t-fail", _set((*_DECISION, "t_uncertain"), 0.71), "t_uncertain"),
    ("t-fail-zero", _set((*_DECISION, "t_fail"), 0.0), "decision.t_fail"),
    ("t-fail-above-one", _set((*_DECISION, "t_fail"), 1.01), "decision.t_fail"),
    ("t-uncertain-negative", _set((*_DECISION, "t_uncertain"), -0.1), "decision.t_uncertain"),
    ("t-fail-not-a-number", _set((*_DECISION, "t_fail"), "high"), "decision.t_fail"),
    # output
    ("defect-label-not-a-label", _set((*_OUTPUT, "defect_label"), "scratch"), "'scratch'"),
    ("duplicate-labels", _set((*_OUTPUT, "labels"), ["ok", "defect", "ok"]), "unique"),
    ("no-labels", _set((*_OUTPUT, "labels"), []), "output.labels"),
    (
        "sigmoid-with-three-labels",
        _all(
            _set((*_OUTPUT, "labels"), ["ok", "scratch", "defect"]),
            _set((*_OUTPUT, "activation"), "sigmoid"),
        ),
        "sigmoid",
    ),
    (
        "sigmoid-with-one-label",
        _all(_set((*_OUTPUT, "labels"), ["defect"]), _set((*_OUTPUT, "activation"), "sigmoid")),
        "sigmoid",
    ),
    ("unknown-activation", _set((*_OUTPUT, "activation"), "relu"), "output.activation"),
    # files and paths
    ("model-not-listed", _set(("model",), "other.onnx"), "'other.onnx'"),
    ("golden-not-listed", _set(("golden", 1, "file"), "golden/scratch.png"), "golden/scratch.png"),
    ("dotdot-path", _add_file("../evil.bin"), "'../evil.bin'"),
    ("dotdot-inner-segment", _add_file("golden/../../evil.bin"), "golden/../../evil.bin"),
    ("dotdot-whole-path", _add_file(".."), "'..'"),
    ("dot-segment", _add_file("./model.onnx"), "'./model.onnx'"),
    ("trailing-dot-segment", _add_file("golden/."), "'golden/.'"),
    ("absolute-path", _add_file("/etc/passwd"), "'/etc/passwd'"),
    ("manifest-name-as-file", _add_file(MANIFEST_NAME), "'bundle.json'"),
    ("backslash-path", _add_file("golden\\x.png"), "golden"),
    ("space-in-path", _add_file("my model.onnx"), "'my model.onnx'"),
    ("empty-path", _add_file(""), "''"),
    ("sha256-uppercase", _set(_MODEL_SHA, _sha(b"model").upper()), "files.model.onnx.sha256"),
    ("sha256-short", _set(_MODEL_SHA, _sha(b"model")[:63]), "files.model.onnx.sha256"),
    ("sha256-long", _set(_MODEL_SHA, _sha(b"model") + "0"), "files.model.onnx.sha256"),
    ("sha256-not-hex", _set(_MODEL_SHA, "g" * 64), "files.model.onnx.sha256"),
    ("negative-length", _set(("files", "model.onnx", "length"), -1), "files.model.onnx.length"),
    ("files-not-an-object", _set(_FILES, ["model.onnx"]), "files: "),
    # top-level scalars
    ("format-two", _set(("format",), 2), "format: "),
    ("format-zero", _set(("format",), 0), "format: "),
    ("unknown-runtime", _set(("runtime",), "tensorrt"), "runtime: "),
    ("name-uppercase", _set(("name",), "Reference"), "name: "),
    ("name-too-long", _set(("name",), "a" * 65), "name: "),
    ("version-with-space", _set(("version",), "1 0"), "version: "),
    # input
    ("unknown-layout", _set((*_INPUT, "layout"), "CHW"), "input.layout"),
    ("unknown-dtype", _set((*_INPUT, "dtype"), "float16"), "input.dtype"),
    ("unknown-color", _set((*_INPUT, "color"), "RGBA"), "input.color"),
    ("unknown-resize", _set((*_INPUT, "resize"), "fill"), "input.resize"),
    ("width-zero", _set((*_INPUT, "width"), 0), "input.width"),
    ("height-too-large", _set((*_INPUT, "height"), 8193), "input.height"),
    ("pad-value-256", _set((*_INPUT, "pad_value"), 256), "input.pad_value"),
    ("std-zero", _set((*_NORM, "std"), [58.0, 0.0, 57.0]), "input.normalization: Value error, std"),
    (
        "std-negative",
        _set((*_NORM, "std"), [58.0, 57.0, -1.0]),
        "input.normalization: Value error, std",
    ),
    ("mean-two-values", _set((*_NORM, "mean"), [1.0, 2.0]), "input.normalization.mean"),
    (
        "roi-past-right-edge",
        _set((*_ROI, "width"), 0.91),
        "input.roi: Value error, region of interest",
    ),
    ("roi-past-bottom-edge", _set((*_ROI, "y"), 0.6), "input.roi: Value error, region of interest"),
    ("roi-x-one", _set((*_ROI, "x"), 1.0), "input.roi.x"),
    ("roi-zero-width", _set((*_ROI, "width"), 0.0), "input.roi.width"),
    # reference profile
    ("reference-missing-feature", _del((*_FEATURES, "sharpness")), "sharpness"),
    ("reference-unknown-feature", _copy_feature("contrast", "hue"), "hue"),
    ("reference-frames-zero", _set(("reference", "frames"), 0), "reference.frames"),
    (
        "counts-one-short",
        _edit_feature("brightness", "counts", lambda c: c[:-1]),
        "reference.features.brightness",
    ),
    (
        "counts-without-overflow-bin-matches-bins",
        _edit_feature("b_mean", "counts", lambda c: c[1:]),
        "counts",
    ),
    ("counts-negative", _edit_feature("g_mean", "counts", lambda c: [-1, *c[1:]]), "counts"),
    (
        "edges-repeated",
        _edit_feature("contrast", "edges", lambda e: [e[0], *e[:-1]]),
        "reference.features.contrast",
    ),
    ("edges-decreasing", _edit_feature("clipped", "edges", lambda e: e[::-1]), "edges"),
    ("edges-one-value", _edit_feature("clipped", "edges", lambda e: e[:1]), "edges"),
    ("feature-std-negative", _set((*_FEATURES, "r_mean", "std"), -0.5), "r_mean.std"),
    ("window-frames-zero", _set((*_FEATURES, "p_defect", "window_frames"), 0), "window_frames"),
    ("window-std-negative", _set((*_FEATURES, "p_defect", "window_mean_std"), -1), "window_mean"),
    # golden samples
    ("golden-p-above-one", _set(("golden", 0, "p_defect"), 1.5), "golden.0.p_defect"),
    ("golden-tolerance-zero", _set(("golden", 1, "tolerance"), 0.0), "golden.1.tolerance"),
]


@pytest.mark.parametrize(
    ("mutate", "needle"),
    [pytest.param(m, n, id=i) for i, m, n in BAD_MANIFESTS],
)
def test_bad_manifest_is_refused_naming_the_key(valid: Raw, mutate: Mutation, needle: str) -> None:
    _parse(valid)  # the fixture itself is valid: the mutation alone makes it bad
    mutate(valid)
    with pytest.raises(ManifestError) as excinfo:
        parse_manifest(json.dumps(valid), source="models/x/bundle.json")
    message = str(excinfo.value)
    assert message.startswith("models/x/bundle.json: ")
    assert needle in message


def test_bad_manifest_table_ids_are_unique() -> None:
    ids = [i for i, _, _ in BAD_MANIFESTS]
    assert len(ids) == len(set(ids))
    assert len(ids) >= 20


def test_every_bad_key_is_named(valid: Raw) -> None:
    valid["input"]["layot"] = "NCHW"
    valid["decision"]["t_fial"] = 0.9
    del valid["name"]
    with pytest.raises(ManifestError) as excinfo:
        _parse(valid)
    message = str(excinfo.value)
    for needle in ("unknown key 'input.layot'", "unknown key 'decision.t_fial'", "'name'"):
        assert needle in message


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        pytest.param("{", "not valid JSON", id="truncated"),
        pytest.param("", "not valid JSON", id="empty"),
        pytest.param('{"format": 1,}', "not valid JSON", id="trailing-comma"),
        pytest.param("{'format': 1}", "not valid JSON", id="single-quotes"),
        pytest.param(b"\xff\xfe\x00{", "not valid JSON", id="not-utf8"),
        pytest.param("[]", "(top level)", id="array"),
        pytest.param('"bundle"', "(top level)", id="string"),
        pytest.param("null", "(top level)", id="null"),
    ],
)
def test_text_that_is_not_a_manifest_object(text: str | bytes, needle: str) -> None:
    with pytest.raises(ManifestError) as excinfo:
        parse_manifest(text, source="x/bundle.json")
    assert str(excinfo.value).startswith("x/bundle.json: ")
    assert needle in str(excinfo.value)


def test_manifest_error_is_a_bundle_error() -> None:
    assert issubclass(ManifestError, BundleError)


def test_default_source_is_manifest_name() -> None:
    with pytest.raises(ManifestError, match=r"^bundle\.json: not valid JSON"):
        parse_manifest("nope")


def test_valid_manifest_parses(valid: Raw) -> None:
    manifest = _parse(valid)
    assert manifest.id == "reference@1.2.0"
    assert manifest.output.defect_index == 1
    assert manifest.model == "model.onnx"
    assert manifest.reference is not None
    assert set(manifest.reference.features) == set(FEATURE_NAMES)
    assert manifest.reference.frames == 40


def test_round_trip_is_unchanged(valid: Raw) -> None:
    manifest = _parse(valid)
    dumped = dump_manifest(manifest)
    again = parse_manifest(dumped)
    assert again == manifest
    assert dump_manifest(again) == dumped
    # Every key of the fixture is spelled out, so the dump is the fixture itself.
    assert json.loads(dumped) == valid


def test_dump_is_canonical(valid: Raw) -> None:
    dumped = dump_manifest(_parse(valid))
    assert dumped.endswith(b"}\n")
    assert not dumped.endswith(b"\n\n")
    assert dumped == (json.dumps(json.loads(dumped), indent=2, sort_keys=True) + "\n").encode()
    # Key order of the input does not matter.
    shuffled = dict(reversed(list(valid.items())))
    assert dump_manifest(_parse(shuffled)) == dumped


def test_minimal_manifest_gets_documented_defaults(valid: Raw) -> None:
    for key in ("format", "description", "reference", "golden"):
        del valid[key]
    for key in ("color", "resize", "pad_value", "normalization", "roi"):
        del valid["input"][key]
    manifest = _parse(valid)
    assert manifest.format == 1
    assert manifest.description == ""
    assert manifest.reference is None
    assert manifest.golden == []
    spec = manifest.input
    assert (spec.color.value, spec.resize.value, spec.pad_value) == ("RGB", "stretch", 0)
    assert spec.normalization.mean == (0.0, 0.0, 0.0)
    assert spec.normalization.std == (255.0, 255.0, 255.0)
    assert spec.roi is None
    assert manifest.golden == []
    raw = json.loads(dump_manifest(manifest))
    assert raw["input"]["normalization"] == {"mean": [0.0, 0.0, 0.0], "std": [255.0] * 3}
    assert raw["reference"] is None


@pytest.mark.parametrize(
    ("labels", "defect", "index"),
    [
        (["ok", "defect"], "defect", 1),
        (["defect", "ok"], "defect", 0),
        (["ok", "scratch", "dent"], "scratch", 1),
        (["dent"], "dent", 0),
    ],
)
def test_defect_index(valid: Raw, labels: list[str], defect: str, index: int) -> None:
    valid["output"] = {"labels": labels, "defect_label": defect, "activation": "softmax"}
    assert _parse(valid).output.defect_index == index


@pytest.mark.parametrize(
    ("t_fail", "t_uncertain"),
    [(1.0, 0.0), (0.5, 0.5), (1e-9, 0.0), (1.0, 1.0)],
)
def test_threshold_edges_are_accepted(valid: Raw, t_fail: float, t_uncertain: float) -> None:
    valid["decision"] = {"t_fail": t_fail, "t_uncertain": t_uncertain}
    decision = _parse(valid).decision
    assert (decision.t_fail, decision.t_uncertain) == (t_fail, t_uncertain)


@pytest.mark.parametrize(
    "path", ["model.onnx", "a/b/c.bin", "golden/ok-1_v2.png", ".hidden", "a..b", "..a", "-x"]
)
def test_safe_paths_are_accepted(valid: Raw, path: str) -> None:
    valid["files"][path] = {"length": 0, "sha256": _sha(b"")}
    assert path in _parse(valid).files


def test_roi_reaching_exactly_the_frame_edge_is_accepted(valid: Raw) -> None:
    valid["input"]["roi"] = {"x": 0.3, "y": 0.6, "width": 0.7, "height": 0.4}
    roi = _parse(valid).input.roi
    assert roi is not None
    assert roi.x + roi.width == pytest.approx(1.0)


def test_manifest_is_frozen(valid: Raw) -> None:
    manifest = _parse(valid)
    with pytest.raises(ValueError, match="frozen"):
        manifest.decision.t_fail = 0.1


def test_protocol_import_is_light() -> None:
    code = (
        "import sys\n"
        "import edge_agent.protocol.manifest\n"
        "import edge_agent.protocol.errors\n"
        "heavy = ('cv2', 'onnxruntime', 'ai_edge_litert', 'tflite_runtime', 'numpy')\n"
        "print(','.join(m for m in heavy if m in sys.modules))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    )
    assert result.stdout.strip() == ""


# Regression: Python's json module accepts the non-JSON tokens NaN and Infinity, and the
# schema does not refuse non-finite floats. A manifest with std Infinity maps every frame to
# the same constant tensor, so every frame silently gets the same verdict.
@pytest.mark.parametrize(
    ("mutate", "needle"),
    [
        pytest.param(_set((*_NORM, "std"), [float("inf")] * 3), "std", id="std-infinity"),
        pytest.param(_set((*_NORM, "mean"), [float("nan")] * 3), "mean", id="mean-nan"),
        pytest.param(
            _set((*_FEATURES, "brightness", "mean"), float("nan")),
            "brightness",
            id="reference-mean-nan",
        ),
    ],
)
def test_non_finite_numbers_are_refused(valid: Raw, mutate: Mutation, needle: str) -> None:
    mutate(valid)
    text = json.dumps(valid)  # writes the bare tokens NaN / Infinity
    with pytest.raises(ManifestError) as excinfo:
        parse_manifest(text)
    assert needle in str(excinfo.value)
