"""The model card (``models/README.md``) of the reference bundles, written from the
training metrics. Pure formatting: metrics in, Markdown out."""

from __future__ import annotations

from typing import Any

GOLDEN_TOLERANCE = 0.05


def _pct(x: float) -> str:
    return f"{100.0 * x:.2f}%"


def _eval_rows(evals: dict[str, Any]) -> str:
    names = {
        "normal": "normal lighting, 640x480",
        "dim60": "brightness 0.6, 640x480",
        "large": "normal lighting, 1280x960",
    }
    rows = []
    for key, title in names.items():
        e = evals[key]
        for rt in ("onnx", "tflite"):
            s = e[rt]
            kinds = ", ".join(f"{k} {_pct(v)}" for k, v in s["recall_by_kind"].items())
            rows.append(
                f"| {title} | {rt} | {s['items']} | {_pct(s['accuracy'])} | "
                f"{_pct(s['defect_recall'])} | {_pct(s['false_fail_rate'])} | "
                f"{_pct(s['uncertain_rate'])} | {kinds} |"
            )
    return "\n".join(rows)


def model_card(m: dict[str, Any]) -> str:
    """``models/README.md``, filled in from the metrics of this run."""
    e, d, t = m["eval"], m["decision"], m["training"]
    agree = "\n".join(
        f"| {k} | {_pct(e[k]['int8_fp32_verdict_agreement'])} | "
        f"{_pct(e[k]['int8_fp32_label_agreement'])} | {e[k]['int8_fp32_max_abs_p_diff']:.3f} |"
        for k in ("normal", "dim60", "large")
    )
    epochs = "\n".join(
        f"| {h['epoch']} | {h['loss']:.4f} | {_pct(h['train_accuracy'])} | "
        f"{_pct(h['val_accuracy'])} | {h['seconds']:.0f} |"
        for h in t["history"]
    )
    blocks = " -> ".join(f"conv3x3/{s} {c}" for c, s in m["model"]["blocks"])
    lat, size = m["latency_ms_median_1thread"], m["bundle_bytes"]
    return f"""# Reference models

Two bundles of one model, the **reference defect classifier** for the synthetic phone-back
line (`edge_agent.core.synthetic`, variant `a`):

| bundle | runtime | model | input | size |
| --- | --- | --- | --- | --- |
| `reference-onnx/` | ONNX Runtime | fp32, opset 17 | NCHW float32, RGB, pixel / 255 | \
{size["onnx"]:,} bytes |
| `reference-tflite/` | LiteRT (ai-edge-litert) | full int8 | NHWC uint8, RGB, raw pixels | \
{size["tflite"]:,} bytes |

Both take the frame stretched to 160x120 (`INTER_AREA` when shrinking, as the agent's
preprocessor does), output two logits for `["ok", "defect"]` (softmax), and carry the same
thresholds, golden samples (6 PNGs: 2 good items, one scratch, dent, crack, missing part;
expected P(defect) computed through the agent's own `Inspector`, tolerance
{GOLDEN_TOLERANCE}) and a reference profile for drift detection. This file and
`reference-metrics.json` are written by the training script; do not edit the numbers by hand.

## How it is made

```
{m["command"]}
```

One command, seeded end to end (data seeds below, `torch.manual_seed(0)`, deterministic
torch algorithms). Wall time on a 2-core x86 box: {m["wall_seconds"]:.0f} s, of which training
{t["seconds"]:.0f} s (torch {t["torch"]}, tensorflow {t["tensorflow"]}). `--help` lists the
knobs (items, epochs, learning rate).

1. **Data**, rendered in memory by `render_item` and fitted to 160x120 by the agent's own
   `Preprocessor.fit`: {m["data"]["train"]["items"]} training items (seed 1000) and
   {m["data"]["val"]["items"]} validation items (seed 2000), rendered at 320x240 (7 in
   10), 640x480 (2 in 10) and 1280x960 (1 in 10), half of them defective (kinds equally
   likely), each with its own lighting: brightness 0.85..1.15, color cast 0.93..1.07 per
   channel, sensor noise 0.5..1.6x. Dim light (0.6) is deliberately *not* in training:
   it is the drift case.
2. **Model**: {blocks}
   (each conv + batch norm + ReLU, symmetric padding 1), global **max** pooling (a
   defect is a small local response that averaging would dilute), linear 128 -> 2.
   {m["model"]["parameters"]:,} parameters, input 1x3x120x160.
   AdamW, one-cycle learning rate, cross-entropy, batch 64.
3. **Export**: batch norm folded into the convolutions (max |P diff|
   {m["validation"]["bn_fold_max_p_diff"]:.1e}); ONNX via `torch.onnx.export` (max |logit diff|
   vs torch in onnxruntime {m["validation"]["onnx_max_logit_diff"]:.1e}); the same weights
   in a Keras NHWC rebuild with explicit zero padding + `valid` convolutions (max |logit
   diff| {m["validation"]["keras_max_logit_diff"]:.1e}), converted by `TFLiteConverter` with
   full-integer quantization (400 training images as representative data, input range
   pinned to 0..1 so the uint8 input has scale 1/255 and zero point 0: raw pixels go in).
4. **Thresholds** from the validation set: `t_fail` = {d["t_fail"]} (the value in 0.30..0.70
   with the best validation accuracy, ties to the one nearest 0.5); `t_uncertain` =
   {d["t_uncertain"]} (the 99th percentile of P(defect) over good validation items, rounded
   up to 0.05, so the uncertain band sends at most about 1% of good parts to review
   while catching defects the model is unsure about).
5. **Reference profile**: {m["data"]["reference"]["items"]} held-out items (seed 3000) of
   the normal line (640x480, brightness 1.0, defect rate 0.1, in index order, windows of
   100 frames): the seven image features of the fitted 160x120 image plus P(defect) of
   *that bundle's own model* (the int8 bundle's profile uses int8 probabilities, which is
   what its devices will report).

## Training

| epoch | loss | train accuracy | validation accuracy | seconds |
| --- | --- | --- | --- | --- |
{epochs}

## What it measures

On line seeds never used in training or threshold choice (900000+), half of the items
defective, through the agent's `Inspector` (same preprocessing and runtimes as a device).
"Fail" means P(defect) >= t_fail; accuracy and recall count `uncertain` as not failed;
the uncertain column is the share of all items in the uncertain band.

| conditions | bundle | items | accuracy | defect recall | false fail | uncertain | recall by kind |
| --- | --- | --- | --- | --- | --- | --- | --- |
{_eval_rows(e)}

int8 (TFLite) vs fp32 (ONNX) on the same images:

| conditions | verdict agreement (pass/fail/uncertain) | fail agreement | max abs P diff |
| --- | --- | --- | --- |
{agree}

Model latency, one thread, median per frame (preprocessed tensor in hand):
ONNX Runtime {lat["onnx"]:.2f} ms, LiteRT int8 {lat["tflite"]:.2f} ms.

Quality bar (accuracy and defect recall >= 98% for both bundles at normal lighting,
int8/fp32 verdict agreement >= 99%): **{"met" if m["quality_bar_met"] else "NOT met"}**.

## Limits

- Synthetic only: one procedural product (variant `a`) on one kind of belt. It says
  nothing about real phones, real cameras or real defects; it exists so the fleet,
  update and drift machinery has a real model with real behaviour to move around.
- Trained for brightness 0.85..1.15. At 0.6 brightness the numbers above show what
  happens; the drift detectors are expected to flag that condition (mean brightness
  and P(defect) histograms move) before anyone trusts those verdicts.
- Variant `b` (gold body, camera on the other side, antenna bands) was never seen: its
  verdicts are meaningless, and its image features sit far outside the reference
  profile on purpose, so drift detection can be tested on a new variant.
- Defects are drawn at least ~0.6% of a 4:3 frame's width thick so they survive
  downscaling to 160x120; smaller real defects would need a larger input or a crop
  (region of interest).
- The reference profile is for this synthetic line at normal lighting; a real line
  needs a profile from its own good production.
"""
