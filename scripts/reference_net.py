"""The reference model's network and its exports: PyTorch definition, batch-norm
folding, ONNX export, and the Keras mirror converted to full-integer TFLite.

Used by ``scripts/train_reference.py``. torch and tensorflow are passed in as modules so
that importing this file does not import them.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

WIDTH, HEIGHT = 160, 120
LABELS = ("ok", "defect")
# (out channels, stride) of each 3x3 conv + BN + ReLU block.
BLOCKS: tuple[tuple[int, int], ...] = ((16, 2), (32, 2), (64, 2), (64, 1), (128, 2))

U8Images = npt.NDArray[np.uint8]
Floats = npt.NDArray[np.float64]


def build_net(torch: Any) -> Any:
    nn = torch.nn
    layers: list[Any] = []
    channels = 3
    for out, stride in BLOCKS:
        layers += [
            nn.Conv2d(channels, out, 3, stride, 1, bias=False),
            nn.BatchNorm2d(out),
            nn.ReLU(inplace=True),
        ]
        channels = out
    # Max pooling: a defect is a small local response; averaging would dilute it.
    layers += [nn.AdaptiveMaxPool2d(1), nn.Flatten(), nn.Linear(channels, len(LABELS))]
    return nn.Sequential(*layers)


def to_batch(torch: Any, images: U8Images) -> Any:
    """BGR uint8 NHWC -> RGB float32 NCHW in 0..1: the manifest's mean 0, std 255."""
    rgb = np.ascontiguousarray(images[..., ::-1].transpose(0, 3, 1, 2))
    return torch.from_numpy(rgb).float().div_(255.0)


def predict(torch: Any, net: Any, images: U8Images, batch: int = 256) -> Floats:
    """P(defect) of each image from a torch net."""
    net.eval()
    out: list[Floats] = []
    with torch.no_grad():
        for a in range(0, len(images), batch):
            logits = net(to_batch(torch, images[a : a + batch]))
            out.append(torch.softmax(logits, dim=1)[:, 1].double().numpy())
    return np.concatenate(out)


def fold_batch_norm(torch: Any, net: Any) -> Any:
    """The same function as ``net`` (in eval mode) with each BN folded into its conv."""
    nn = torch.nn
    layers: list[Any] = []
    modules = list(net)
    i = 0
    while i < len(modules):
        m = modules[i]
        if isinstance(m, nn.Conv2d) and i + 1 < len(modules):
            bn = modules[i + 1]
            scale = bn.weight.detach() / torch.sqrt(bn.running_var + bn.eps)
            conv = nn.Conv2d(
                m.in_channels, m.out_channels, m.kernel_size, m.stride, m.padding, bias=True
            )
            with torch.no_grad():
                conv.weight.copy_(m.weight.detach() * scale.reshape(-1, 1, 1, 1))
                conv.bias.copy_(bn.bias.detach() - bn.running_mean * scale)
            layers.append(conv)
            i += 2
            continue
        layers.append(m)
        i += 1
    folded = nn.Sequential(*layers).eval()
    return folded.to(memory_format=torch.contiguous_format)


def export_onnx(torch: Any, folded: Any, path: Path, check: U8Images) -> float:
    """Write ``folded`` as ONNX (opset 17, batch 1); return max |logit diff| vs torch."""
    import onnxruntime as ort

    dummy = torch.zeros(1, 3, HEIGHT, WIDTH)
    torch.onnx.export(
        folded,
        (dummy,),
        str(path),
        input_names=["input"],
        output_names=["logits"],
        opset_version=17,
        dynamo=False,
    )
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    worst = 0.0
    with torch.no_grad():
        for image in check:
            x = to_batch(torch, image[np.newaxis])
            ref = folded(x).numpy()
            got = session.run(None, {"input": x.numpy()})[0]
            worst = max(worst, float(np.abs(ref - got).max()))
    return worst


def build_keras(tf: Any, torch: Any, folded: Any) -> Any:
    """The folded net in Keras, NHWC; explicit zero padding + 'valid' conv reproduces
    PyTorch's symmetric padding exactly (Keras 'same' pads stride-2 convs asymmetrically)."""
    keras = tf.keras
    inp = keras.Input((HEIGHT, WIDTH, 3), batch_size=1, name="input")
    x = inp
    weights: list[npt.NDArray[np.float32]] = []
    for m in folded:
        if isinstance(m, torch.nn.Conv2d):
            x = keras.layers.ZeroPadding2D(m.padding[0])(x)
            x = keras.layers.Conv2D(
                m.out_channels, m.kernel_size, strides=m.stride, padding="valid"
            )(x)
            weights += [
                m.weight.detach().numpy().transpose(2, 3, 1, 0),
                m.bias.detach().numpy(),
            ]
        elif isinstance(m, torch.nn.ReLU):
            x = keras.layers.ReLU()(x)
        elif isinstance(m, torch.nn.AdaptiveMaxPool2d):
            x = keras.layers.GlobalMaxPooling2D()(x)
        elif isinstance(m, torch.nn.Linear):
            x = keras.layers.Dense(m.out_features, name="logits")(x)
            weights += [m.weight.detach().numpy().T, m.bias.detach().numpy()]
    model = keras.Model(inp, x)
    model.set_weights(weights)
    return model


def nhwc(images: U8Images) -> npt.NDArray[np.float32]:
    return np.ascontiguousarray(images[..., ::-1], dtype=np.float32) / np.float32(255.0)


def export_tflite(
    tf: Any, torch: Any, folded: Any, path: Path, *, calibration: U8Images, check: U8Images
) -> float:
    """Write a full-integer TFLite model (uint8 input, int8 output); return max |logit
    diff| between the Keras float rebuild and torch."""
    model = build_keras(tf, torch, folded)
    worst = 0.0
    with torch.no_grad():
        for image in check:
            ref = folded(to_batch(torch, image[np.newaxis])).numpy()
            got = model(nhwc(image[np.newaxis]), training=False).numpy()
            worst = max(worst, float(np.abs(ref - got).max()))

    def representative() -> Iterator[list[npt.NDArray[np.float32]]]:
        for k, image in enumerate(calibration):
            x = nhwc(image[np.newaxis])
            if k == 0:
                # Pin the input range to exactly 0..1 so the input's quantization is
                # scale 1/255, zero point 0: raw pixels go straight in.
                x[0, 0, 0, :] = 0.0
                x[0, 0, 1, :] = 1.0
            yield [x]

    converter = tf.lite.TFLiteConverter.from_keras_model(model)
    converter.optimizations = [tf.lite.Optimize.DEFAULT]
    converter.representative_dataset = representative
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
    converter.inference_input_type = tf.uint8
    converter.inference_output_type = tf.int8
    path.write_bytes(converter.convert())
    return worst
