"""Third-party graphs for the tests, taken from installed packages at test time (never committed):
the ``onnx`` package's model-zoo structures, pretrained classifiers inside wheels, and sample
photos from ``scikit-image``."""

from __future__ import annotations

import importlib.util
import pathlib

import numpy as np
import onnx
from onnx import numpy_helper

ZOO = ["bvlc_alexnet", "densenet121", "inception_v1", "inception_v2", "resnet50", "shufflenet", "squeezenet",
       "vgg19", "zfnet512"]


def package_file(package: str, relative: str) -> pathlib.Path:
    """A data file inside an installed package, located without importing the package (the
    wheels are installed without their runtime dependencies)."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"package {package} is not installed (see README, 'Tests')")
    path = pathlib.Path(list(spec.submodule_search_locations)[0]) / relative
    if not path.exists():
        raise FileNotFoundError(path)
    return path


def zoo_model(name: str, seed: int = 0) -> onnx.ModelProto:
    """A model-zoo structure from ``onnx/backend/test/data/light`` with its ``ConstantOfShape``
    weights replaced by seeded He-initialised tensors (BatchNorm: scale 1, variance 1, small
    mean and bias; scales written as Mul: about 1; shifts written as Add: small)."""
    model = onnx.load(package_file("onnx", f"backend/test/data/light/light_{name}.onnx"))
    graph, rng = model.graph, np.random.default_rng(seed)
    initializers = {t.name: t for t in graph.initializer}
    consumers: dict[str, list] = {}
    for node in graph.node:
        for index, name_in in enumerate(node.input):
            consumers.setdefault(name_in, []).append((node, index))
    kept = []
    for node in graph.node:
        if node.op_type != "ConstantOfShape":
            kept.append(node)
            continue
        shape = numpy_helper.to_array(initializers[node.input[0]]).astype(int).tolist()
        value = _weight(shape, consumers, node.output[0], rng)
        graph.initializer.append(numpy_helper.from_array(value.astype(np.float32), node.output[0]))
    del graph.node[:]
    graph.node.extend(kept)
    _calibrate_head(model, rng)
    return model


def _calibrate_head(model: onnx.ModelProto, rng) -> None:
    """Scale the last linear layer so the logits have a standard deviation of about 3: random
    weights without calibrated BatchNorm make residual stacks (ShuffleNet) blow activations up,
    and a saturated softmax has a zero gradient, hence an all-zero explanation."""
    import onnxruntime as ort

    graph = model.graph
    head = [n for n in graph.node if n.op_type in ("Gemm", "Conv")][-1]
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    probe.graph.output.append(onnx.helper.make_tensor_value_info(head.output[0], onnx.TensorProto.FLOAT, None))
    image = [i for i in probe.graph.input if i.name not in {t.name for t in probe.graph.initializer}][0]
    shape = [d.dim_value for d in image.type.tensor_type.shape.dim]
    session = ort.InferenceSession(probe.SerializeToString(), providers=["CPUExecutionProvider"])
    logits = session.run([head.output[0]], {image.name: rng.standard_normal(shape).astype(np.float32)})[0]
    scale = 3.0 / max(float(logits.std()), 1e-6)
    for index in (1, 2):
        tensor = next((t for t in graph.initializer if len(head.input) > index and t.name == head.input[index]), None)
        if tensor is not None:
            tensor.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(tensor) * np.float32(scale), tensor.name))


def _weight(shape, consumers, name, rng):
    reader, index = consumers[name][0]
    while reader.op_type == "Unsqueeze":  # BatchNorm written as Mul/Add of unsqueezed vectors
        reader, index = consumers[reader.output[0]][0]
    if reader.op_type == "Conv" and index == 1:
        return rng.standard_normal(shape) * np.sqrt(2.0 / np.prod(shape[1:]))
    if reader.op_type == "Gemm" and index == 1:
        fan_in = shape[1] if any(a.name == "transB" and a.i for a in reader.attribute) else shape[0]
        return rng.standard_normal(shape) * np.sqrt(2.0 / fan_in)
    if reader.op_type == "BatchNormalization":
        return np.ones(shape) if index in (1, 4) else 0.1 * rng.standard_normal(shape)
    if reader.op_type == "Mul":
        return 1.0 + 0.1 * rng.standard_normal(shape)
    return 0.05 * rng.standard_normal(shape)


def photo(name: str = "astronaut", size: tuple[int, int] = (224, 224)) -> np.ndarray:
    """A sample photo from scikit-image as float32 RGB ``[H, W, 3]`` in [0, 1], resized."""
    import skimage.data
    import skimage.transform

    image = getattr(skimage.data, name)()
    if image.ndim == 2:
        image = np.stack([image] * 3, -1)
    return skimage.transform.resize(image[..., :3], size, anti_aliasing=True).astype(np.float32)
