"""Train the reference defect model on the synthetic line and write its two bundles.

    make train        (creates .venv-train with the ``train`` extra, then runs this)

Needs the ``train`` extra (torch, tensorflow-cpu, onnx) plus onnxruntime and
ai-edge-litert, with this project installed. Everything is seeded: the data comes from
``edge_agent.core.synthetic.render_item`` with fixed seeds, and torch runs with
deterministic algorithms, so a rerun on the same machine writes the same numbers.

Steps: render data -> train a small CNN (PyTorch) -> fold batch norm -> export ONNX
(fp32) and TFLite (full int8, uint8 input) -> choose thresholds on validation data ->
golden samples and reference profile -> seal ``models/reference-onnx`` and
``models/reference-tflite`` -> evaluate both bundles through the agent's own
``Inspector`` on seeds never used in training -> ``models/reference-metrics.json`` and the
model card ``models/README.md``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import time
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import numpy.typing as npt
from reference_card import GOLDEN_TOLERANCE, model_card
from reference_net import (
    BLOCKS,
    HEIGHT,
    LABELS,
    WIDTH,
    Floats,
    U8Images,
    build_net,
    export_onnx,
    export_tflite,
    fold_batch_norm,
    predict,
    to_batch,
)

from edge_agent.bundle import seal_bundle
from edge_agent.core.features import build_reference_profile, image_features
from edge_agent.core.preprocess import Preprocessor
from edge_agent.core.synthetic import DEFECT_KINDS, NO_DEFECT, LineConditions, render_item
from edge_agent.core.verdict import Outcome
from edge_agent.durable import write_atomic
from edge_agent.inspect import Inspector
from edge_agent.protocol.manifest import MANIFEST_NAME, InputSpec

ROOT = Path(__file__).resolve().parent.parent
VERSION = "1.0.0"
FLOAT_INPUT = InputSpec.model_validate(
    {"width": WIDTH, "height": HEIGHT, "layout": "NCHW", "dtype": "float32"}
)
GOLDEN_KINDS: tuple[str, ...] = (NO_DEFECT, NO_DEFECT, *DEFECT_KINDS)


@dataclass(frozen=True, slots=True)
class Split:
    """One deterministic data set: items ``0..count-1`` of line ``seed``.

    With ``augment`` each item gets its own lighting (brightness 0.85..1.15, mild color
    cast, sensor noise 0.5..1.6x) from ``SeedSequence([seed, index, 99])``; otherwise
    all items use ``conditions``. Sizes cycle over ``sizes``.
    """

    name: str
    seed: int
    count: int
    sizes: tuple[tuple[int, int], ...]
    conditions: LineConditions
    augment: bool = False


@dataclass(frozen=True, slots=True)
class Data:
    images: U8Images  # N x 120 x 160 x 3 BGR, as the agent's preprocessor fits them
    labels: npt.NDArray[np.int64]  # 1 = defect
    kinds: tuple[str, ...]  # defect kind or "none"


def item_conditions(split: Split, index: int) -> LineConditions:
    if not split.augment:
        return split.conditions
    rng = np.random.default_rng(np.random.SeedSequence([split.seed, index, 99]))
    cast = rng.uniform(0.93, 1.07, size=3)
    return LineConditions(
        brightness=float(rng.uniform(0.85, 1.15)),
        color_cast=(float(cast[0]), float(cast[1]), float(cast[2])),
        defect_rate=split.conditions.defect_rate,
        variant=split.conditions.variant,
        noise=float(rng.uniform(0.5, 1.6)),
    )


def _render_chunk(job: tuple[Split, int, int]) -> Data:
    split, start, stop = job
    fit = Preprocessor(FLOAT_INPUT).fit
    images = np.empty((stop - start, HEIGHT, WIDTH, 3), dtype=np.uint8)
    labels = np.empty(stop - start, dtype=np.int64)
    kinds: list[str] = []
    for k, index in enumerate(range(start, stop)):
        size = split.sizes[index % len(split.sizes)]
        item = render_item(split.seed, index, size, item_conditions(split, index))
        images[k] = fit(item.image)
        labels[k] = int(item.label == "defect")
        kinds.append(item.defect or NO_DEFECT)
    return Data(images, labels, tuple(kinds))


def _init_worker() -> None:
    cv2.setNumThreads(1)


def render_split(split: Split, pool: ProcessPoolExecutor) -> Data:
    started = time.perf_counter()
    step = 500
    jobs = [(split, a, min(a + step, split.count)) for a in range(0, split.count, step)]
    parts = list(pool.map(_render_chunk, jobs))
    data = Data(
        np.concatenate([p.images for p in parts]),
        np.concatenate([p.labels for p in parts]),
        tuple(k for p in parts for k in p.kinds),
    )
    took = time.perf_counter() - started
    print(
        f"data {split.name}: {split.count} items, {data.labels.mean():.1%} defective, {took:.0f} s",
        flush=True,
    )
    return data


# --- model -------------------------------------------------------------------------------


def train(torch: Any, args: argparse.Namespace, data: Data, val: Data) -> tuple[Any, list[Any]]:
    torch.manual_seed(args.seed)
    net = build_net(torch).to(memory_format=torch.channels_last)
    params = sum(p.numel() for p in net.parameters())
    print(f"model: {params} parameters, blocks {BLOCKS}", flush=True)
    steps_per_epoch = math.ceil(len(data.labels) / args.batch)
    opt = torch.optim.AdamW(net.parameters(), lr=args.lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=args.lr, total_steps=args.epochs * steps_per_epoch, pct_start=0.15
    )
    gen = torch.Generator().manual_seed(args.seed)
    labels = torch.from_numpy(data.labels)
    history: list[Any] = []
    for epoch in range(1, args.epochs + 1):
        started = time.perf_counter()
        net.train()
        order = torch.randperm(len(labels), generator=gen).numpy()
        total, correct, seen = 0.0, 0, 0
        for a in range(0, len(order), args.batch):
            idx = np.sort(order[a : a + args.batch])
            x = to_batch(torch, data.images[idx]).contiguous(memory_format=torch.channels_last)
            y = labels[idx]
            logits = net(x)
            loss = torch.nn.functional.cross_entropy(logits, y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total += float(loss.detach()) * len(idx)
            correct += int((logits.argmax(1) == y).sum())
            seen += len(idx)
        p_val = predict(torch, net, val.images)
        val_acc = float(((p_val >= 0.5) == (val.labels == 1)).mean())
        row = {
            "epoch": epoch,
            "loss": round(total / seen, 5),
            "train_accuracy": round(correct / seen, 5),
            "val_accuracy": round(val_acc, 5),
            "seconds": round(time.perf_counter() - started, 1),
        }
        history.append(row)
        print(
            f"epoch {epoch}/{args.epochs}  loss {row['loss']:.4f}  "
            f"train acc {row['train_accuracy']:.4f}  val acc {val_acc:.4f}  "
            f"({row['seconds']:.0f} s)",
            flush=True,
        )
    net.eval()
    return net, history


# --- export ------------------------------------------------------------------------------


def measure_latency(bundle_dir: Path, images: U8Images, runs: int = 500) -> float:
    """Median ms per frame of the model alone (1 thread), preprocessed tensor in hand."""
    inspector = Inspector.open(bundle_dir)
    try:
        tensors = [inspector.preprocessor(images[k % len(images)]) for k in range(runs)]
        for t in tensors[:50]:
            inspector.runtime.run(t)
        times = []
        for t in tensors:
            started = time.perf_counter()
            inspector.runtime.run(t)
            times.append((time.perf_counter() - started) * 1000.0)
    finally:
        inspector.close()
    return float(np.median(times))


# --- bundles -----------------------------------------------------------------------------


def choose_thresholds(p: Floats, labels: npt.NDArray[np.int64]) -> dict[str, float]:
    """t_fail: the grid value in 0.30..0.70 with the best validation accuracy (ties go to
    the one nearest 0.5). t_uncertain: the 99th percentile of P(defect) over good
    validation items, rounded up to 0.05 and clamped to 0.05..t_fail, so the uncertain
    band sends at most about 1% of good parts to review."""
    grid = np.round(np.arange(0.30, 0.701, 0.05), 2)
    acc = [float(((p >= t) == (labels == 1)).mean()) for t in grid]
    best = max(acc)
    t_fail = float(
        min((t for t, a in zip(grid, acc, strict=True) if a == best), key=lambda t: abs(t - 0.5))
    )
    q = float(np.quantile(p[labels == 0], 0.99))
    t_uncertain = min(t_fail, max(0.05, math.ceil(q / 0.05 - 1e-9) * 0.05))
    return {"t_fail": round(t_fail, 2), "t_uncertain": round(t_uncertain, 2)}


def golden_images(torch: Any, net: Any, seed: int) -> list[tuple[str, U8Images]]:
    """Good items and one of each defect kind, 640x480 renders fitted to 160x120; each
    is the first item of its kind (of 50 tried) that the fp32 model gets right."""
    fit = Preprocessor(FLOAT_INPUT).fit
    chosen: list[tuple[str, U8Images]] = []
    index = 0
    for n, kind in enumerate(GOLDEN_KINDS):
        for attempt in range(50):
            item = render_item(seed, index, (640, 480), LineConditions(), defect=kind)
            index += 1
            image = fit(item.image)
            p = float(predict(torch, net, image[np.newaxis])[0])
            if (p >= 0.5) == (kind != NO_DEFECT) or attempt == 49:
                name = f"ok-{n + 1}" if kind == NO_DEFECT else kind
                chosen.append((f"golden/{name}.png", image))
                break
    return chosen


def write_bundle(
    directory: Path,
    runtime: str,
    model_file: Path,
    *,
    golden: Sequence[tuple[str, U8Images]],
    thresholds: dict[str, float],
    reference: Data,
) -> dict[str, Any]:
    """Write and seal one bundle; golden P(defect) and the reference profile's P(defect)
    come from the bundle itself, run by the agent's ``Inspector``."""
    if directory.exists():
        shutil.rmtree(directory)
    (directory / "golden").mkdir(parents=True)
    model_name = "model.onnx" if runtime == "onnx" else "model.tflite"
    shutil.copyfile(model_file, directory / model_name)
    for name, image in golden:
        if not cv2.imwrite(str(directory / name), image):
            raise RuntimeError(f"cannot write {directory / name}")
    layout, dtype = ("NCHW", "float32") if runtime == "onnx" else ("NHWC", "uint8")
    draft: dict[str, Any] = {
        "format": 1,
        "name": f"reference-{runtime}",
        "version": VERSION,
        "runtime": runtime,
        "model": model_name,
        "description": (
            "Reference defect classifier for the synthetic phone-back line (variant a): "
            "ok vs defect (scratch, dent, crack, missing part). See models/README.md."
        ),
        "input": {
            "width": WIDTH,
            "height": HEIGHT,
            "layout": layout,
            "dtype": dtype,
            "color": "RGB",
            "resize": "stretch",
            "normalization": {"mean": [0.0, 0.0, 0.0], "std": [255.0, 255.0, 255.0]},
        },
        "output": {"labels": list(LABELS), "defect_label": "defect", "activation": "softmax"},
        "decision": thresholds,
        "golden": [{"file": n, "p_defect": 0.0, "tolerance": GOLDEN_TOLERANCE} for n, _ in golden],
    }
    seal_bundle(directory, draft)
    inspector = Inspector.open(directory)
    try:
        draft["golden"] = [
            {"file": r.file, "p_defect": round(r.got, 6), "tolerance": GOLDEN_TOLERANCE}
            for r in inspector.self_test()
        ]
    finally:
        inspector.close()
    draft["reference"] = reference_section(directory, reference)
    seal_bundle(directory, draft)
    check = Inspector.open(directory)
    try:
        failed = [r.file for r in check.self_test() if not r.ok]
    finally:
        check.close()
    if failed:
        raise RuntimeError(f"{directory}: golden samples fail their own check: {failed}")
    return draft


def reference_section(directory: Path, reference: Data) -> dict[str, Any]:
    """The bundle's reference profile: image features of the reference split and the
    bundle's own P(defect) on it (run by the agent's ``Inspector``)."""
    inspector = Inspector.open(directory)
    try:
        p_ref = np.array([inspector.inspect_image(im).p_defect for im in reference.images])
    finally:
        inspector.close()
    features = np.array([image_features(im) for im in reference.images])
    rows = np.column_stack([features, p_ref])
    return build_reference_profile(rows, window_frames=100).model_dump(mode="json")


def refresh_profiles(args: argparse.Namespace) -> int:
    """Recompute only the reference profiles of the committed bundles (after a change to
    the feature definitions); models, thresholds and golden samples stay as they are."""
    cv2.setNumThreads(1)
    with ProcessPoolExecutor(max_workers=args.workers, initializer=_init_worker) as pool:
        reference = render_split(splits(args)["reference"], pool)
    for rt in ("onnx", "tflite"):
        directory = args.out / f"reference-{rt}"
        draft = json.loads((directory / MANIFEST_NAME).read_text())
        del draft["files"]
        draft["reference"] = reference_section(directory, reference)
        seal_bundle(directory, draft)
        print(f"bundle {directory}: reference profile refreshed", flush=True)
    return 0


# --- evaluation --------------------------------------------------------------------------


def run_bundle(bundle_dir: Path, data: Data) -> tuple[Floats, list[Outcome]]:
    inspector = Inspector.open(bundle_dir)
    try:
        verdicts = [inspector.inspect_image(im, frame_id=k) for k, im in enumerate(data.images)]
    finally:
        inspector.close()
    return np.array([v.p_defect for v in verdicts]), [v.outcome for v in verdicts]


def score(p: Floats, outcomes: list[Outcome], data: Data, t_fail: float) -> dict[str, Any]:
    """Binary scores at p >= t_fail (``fail``); ``uncertain`` counts as not failed here
    and is reported separately."""
    pred = p >= t_fail
    truth = data.labels == 1
    kinds = np.array(data.kinds)
    return {
        "items": len(p),
        "accuracy": round(float((pred == truth).mean()), 5),
        "defect_recall": round(float(pred[truth].mean()), 5),
        "false_fail_rate": round(float(pred[~truth].mean()), 5),
        "uncertain_rate": round(float(np.mean([o is Outcome.UNCERTAIN for o in outcomes])), 5),
        "recall_by_kind": {
            k: round(float(pred[kinds == k].mean()), 5) for k in DEFECT_KINDS if (kinds == k).any()
        },
    }


def evaluate(name: str, data: Data, bundles: dict[str, Path], t_fail: float) -> dict[str, Any]:
    result: dict[str, Any] = {}
    runs = {rt: run_bundle(path, data) for rt, path in bundles.items()}
    for rt, (p, outcomes) in runs.items():
        result[rt] = score(p, outcomes, data, t_fail)
    (p_a, o_a), (p_b, o_b) = runs["onnx"], runs["tflite"]
    result["int8_fp32_verdict_agreement"] = round(
        float(np.mean([a == b for a, b in zip(o_a, o_b, strict=True)])), 5
    )
    result["int8_fp32_label_agreement"] = round(
        float(((p_a >= t_fail) == (p_b >= t_fail)).mean()), 5
    )
    result["int8_fp32_max_abs_p_diff"] = round(float(np.abs(p_a - p_b).max()), 5)
    print(f"eval {name}:", flush=True)
    for rt in bundles:
        s = result[rt]
        print(
            f"  {rt:6s} accuracy {s['accuracy']:.4f}  recall {s['defect_recall']:.4f}  "
            f"false fail {s['false_fail_rate']:.4f}  uncertain {s['uncertain_rate']:.4f}  "
            f"by kind {s['recall_by_kind']}",
            flush=True,
        )
    print(
        f"  int8 vs fp32: verdict agreement {result['int8_fp32_verdict_agreement']:.4f}, "
        f"label agreement {result['int8_fp32_label_agreement']:.4f}",
        flush=True,
    )
    return result


# --- model card --------------------------------------------------------------------------


# --- main --------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Train the reference defect model on the synthetic line and write "
        "models/reference-onnx, models/reference-tflite, models/reference-metrics.json "
        "and the model card models/README.md.",
    )
    parser.add_argument("--out", type=Path, default=ROOT / "models", help="models directory")
    parser.add_argument("--train-items", type=int, default=24000, help="training images")
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--lr", type=float, default=3e-3, help="peak learning rate")
    parser.add_argument("--seed", type=int, default=0, help="torch seed")
    parser.add_argument("--eval-items", type=int, default=2000, help="per evaluation set")
    parser.add_argument("--reference-items", type=int, default=3000)
    parser.add_argument(
        "--profiles-only",
        action="store_true",
        help="only recompute the reference profiles of the bundles in --out (no training; "
        "needs neither torch nor tensorflow)",
    )
    parser.add_argument("--workers", type=int, default=2, help="processes rendering data")
    return parser.parse_args(argv)


def splits(args: argparse.Namespace) -> dict[str, Split]:
    """All data sets. Seeds never overlap: 1000 train, 2000 validation, 3000 reference,
    5000 golden, 900000+ evaluation."""
    train_mix = ((320, 240),) * 7 + ((640, 480),) * 2 + ((1280, 960),)
    half = LineConditions(defect_rate=0.5)
    n_eval = args.eval_items
    return {
        "train": Split("train", 1000, args.train_items, train_mix, half, augment=True),
        "val": Split("val", 2000, 2000, train_mix, half, augment=True),
        "reference": Split(
            "reference", 3000, args.reference_items, ((640, 480),), LineConditions()
        ),
        "normal": Split("normal", 900000, n_eval, ((640, 480),), half),
        "dim60": Split(
            "dim60", 900001, n_eval, ((640, 480),), LineConditions(brightness=0.6, defect_rate=0.5)
        ),
        "large": Split("large", 900002, max(100, n_eval * 3 // 20), ((1280, 960),), half),
    }


def bundle_bytes(directory: Path) -> int:
    return sum(p.stat().st_size for p in directory.rglob("*") if p.is_file())


def quality_bar(metrics: dict[str, Any]) -> list[str]:
    """The bar the reference model must meet; returns what it misses."""
    misses = []
    normal = metrics["eval"]["normal"]
    for rt in ("onnx", "tflite"):
        for key in ("accuracy", "defect_recall"):
            if normal[rt][key] < 0.98:
                misses.append(f"{rt} {key} {normal[rt][key]:.4f} < 0.98 at normal lighting")
    if normal["int8_fp32_verdict_agreement"] < 0.99:
        misses.append("int8/fp32 verdict agreement < 0.99")
    return misses


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.profiles_only:
        return refresh_profiles(args)
    wall = time.perf_counter()
    cv2.setNumThreads(1)
    sets = splits(args)
    with ProcessPoolExecutor(max_workers=args.workers, initializer=_init_worker) as pool:
        data = {name: render_split(split, pool) for name, split in sets.items()}

    import torch

    torch.set_num_threads(args.workers)
    torch.use_deterministic_algorithms(True)
    started = time.perf_counter()
    net, history = train(torch, args, data["train"], data["val"])
    train_seconds = time.perf_counter() - started
    folded = fold_batch_norm(torch, net)
    val_p = predict(torch, net, data["val"].images)
    fold_diff = float(np.abs(predict(torch, folded, data["val"].images[:200]) - val_p[:200]).max())
    print(f"BN folded: max |p diff| {fold_diff:.2e}", flush=True)
    thresholds = choose_thresholds(val_p, data["val"].labels)
    print(f"thresholds from validation: {thresholds}", flush=True)

    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import tensorflow as tf

    build = args.out / ".build"
    build.mkdir(parents=True, exist_ok=True)
    check = data["val"].images[:64]
    onnx_diff = export_onnx(torch, folded, build / "model.onnx", check)
    print(f"ONNX written: max |logit diff| vs torch {onnx_diff:.2e}", flush=True)
    calibration = data["train"].images[:: max(1, len(data["train"].images) // 400)][:400]
    keras_diff = export_tflite(
        tf, torch, folded, build / "model.tflite", calibration=calibration, check=check
    )
    print(f"TFLite int8 written: Keras float max |logit diff| vs torch {keras_diff:.2e}")
    if onnx_diff > 1e-3 or keras_diff > 1e-3:
        raise RuntimeError("exported model does not match torch")

    golden = golden_images(torch, net, 5000)
    bundles = {rt: args.out / f"reference-{rt}" for rt in ("onnx", "tflite")}
    drafts = {}
    for rt, directory in bundles.items():
        model_file = build / ("model.onnx" if rt == "onnx" else "model.tflite")
        drafts[rt] = write_bundle(
            directory,
            rt,
            model_file,
            golden=golden,
            thresholds=thresholds,
            reference=data["reference"],
        )
        print(f"bundle {directory}: {bundle_bytes(directory)} bytes, golden ok", flush=True)
    shutil.rmtree(build)

    latency = {rt: measure_latency(path, data["normal"].images) for rt, path in bundles.items()}
    print(f"model latency, 1 thread, median ms/frame: {latency}", flush=True)
    t_fail = thresholds["t_fail"]
    evals = {
        name: evaluate(name, data[name], bundles, t_fail) for name in ("normal", "dim60", "large")
    }
    val_pred = val_p >= t_fail
    metrics: dict[str, Any] = {
        "command": "make train",
        # Paths are recorded relative to the working directory: no machine's layout.
        "arguments": {k: _portable(v) for k, v in vars(args).items()},
        "data": {
            name: {
                "seed": s.seed,
                "items": s.count,
                "sizes": [list(z) for z in sorted(set(s.sizes))],
                "brightness": "0.85..1.15" if s.augment else s.conditions.brightness,
                "defect_rate": s.conditions.defect_rate,
                "variant": s.conditions.variant,
            }
            for name, s in sets.items()
        },
        "model": {
            "parameters": int(sum(p.numel() for p in folded.parameters())),
            "blocks": [list(b) for b in BLOCKS],
            "input": [1, 3, HEIGHT, WIDTH],
        },
        "training": {
            "history": history,
            "seconds": round(train_seconds, 1),
            "torch": str(torch.__version__),
            "tensorflow": str(tf.__version__),
        },
        "validation": {
            "items": len(val_p),
            "accuracy_fp32": round(float((val_pred == (data["val"].labels == 1)).mean()), 5),
            "bn_fold_max_p_diff": fold_diff,
            "onnx_max_logit_diff": onnx_diff,
            "keras_max_logit_diff": keras_diff,
        },
        "decision": thresholds,
        "latency_ms_median_1thread": {k: round(v, 3) for k, v in latency.items()},
        "bundle_bytes": {rt: bundle_bytes(path) for rt, path in bundles.items()},
        "golden": {rt: d["golden"] for rt, d in drafts.items()},
        "eval": evals,
    }
    metrics["wall_seconds"] = round(time.perf_counter() - wall, 1)
    misses = quality_bar(metrics)
    metrics["quality_bar_met"] = not misses
    out = args.out
    write_atomic(out / "reference-metrics.json", (json.dumps(metrics, indent=2) + "\n").encode())
    write_atomic(out / "README.md", model_card(metrics).encode())
    print(f"wrote {out / 'reference-metrics.json'} and {out / 'README.md'}")
    print(f"wall time {metrics['wall_seconds']:.0f} s (training {train_seconds:.0f} s)")
    for miss in misses:
        print(f"QUALITY BAR MISSED: {miss}", file=sys.stderr)
    return 1 if misses else 0


def _portable(value: object) -> object:
    if not isinstance(value, Path):
        return value
    try:
        return value.resolve().relative_to(Path.cwd().resolve()).as_posix()
    except ValueError:
        return value.name


if __name__ == "__main__":
    sys.exit(main())
