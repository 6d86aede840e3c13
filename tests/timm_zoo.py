"""timm 1.0 architectures with seeded random weights, exported with ``torch.onnx`` at opset 17.

timm imports torchvision at load time, and torchvision does not import beside the CPU torch used
here (the wheels on the index are CUDA builds). timm needs only a handful of names from it to build
and export models: :func:`stand_in_torchvision` installs an import-only module tree in
``sys.modules`` (placeholder classes for everything but ``FrozenBatchNorm2d``, which is real).

Each model is built at a small input size where its architecture allows (``img_size``), in eval
mode, and exported once per process into a cache folder (``AGF_TIMM_CACHE`` if set, else a
temporary folder): exporting a model costs seconds to tens of seconds on two cores."""

from __future__ import annotations

import contextlib
import dataclasses
import enum
import hashlib
import importlib.machinery
import io
import logging
import os
import pathlib
import sys
import tempfile
import time
import types
import warnings

import onnx
import torch


class _FrozenBatchNorm2d(torch.nn.Module):
    """torchvision's ``FrozenBatchNorm2d``: BatchNorm with fixed statistics and affine parameters."""

    def __init__(self, num_features: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        for name, value in (("weight", 1.0), ("bias", 0.0), ("running_mean", 0.0), ("running_var", 1.0)):
            self.register_buffer(name, torch.full((num_features,), value))

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        state_dict.pop(prefix + "num_batches_tracked", None)  # BatchNorm checkpoints carry it
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = self.weight * (self.running_var + self.eps).rsqrt()
        shift = self.bias - self.running_mean * scale
        return x * scale.reshape(1, -1, 1, 1) + shift.reshape(1, -1, 1, 1)


class _InterpolationMode(enum.Enum):
    """torchvision's ``InterpolationMode`` (timm's transforms map its members to PIL names)."""

    NEAREST = "nearest"
    NEAREST_EXACT = "nearest-exact"
    BILINEAR = "bilinear"
    BICUBIC = "bicubic"
    BOX = "box"
    HAMMING = "hamming"
    LANCZOS = "lanczos"


class _StandInModule(types.ModuleType):
    """A module whose every missing public attribute is a placeholder class: importing a name works,
    using it (a transform, a dataset) is never needed to build or export a model."""

    def __getattr__(self, name: str):
        if name.startswith("__"):
            raise AttributeError(name)
        placeholder = type(name, (), {"__module__": self.__name__})
        setattr(self, name, placeholder)
        return placeholder


_SUBMODULES = ("ops", "ops.misc", "transforms", "transforms.functional", "transforms.v2", "datasets", "models",
               "models.resnet", "models.feature_extraction", "utils", "io")


def stand_in_torchvision() -> None:
    """Install (or complete) the import-only torchvision tree. Another stand-in may already be in
    ``sys.modules`` (Zennit's oracle installs a smaller one): its modules are kept and extended."""
    real = sys.modules.get("torchvision")
    if real is not None and getattr(real, "__file__", None):
        return  # a working torchvision
    names = ["torchvision"] + [f"torchvision.{s}" for s in _SUBMODULES]
    for name in names:
        if name not in sys.modules:
            sys.modules[name] = _StandInModule(name)
        elif not isinstance(sys.modules[name], _StandInModule):
            sys.modules[name].__class__ = _StandInModule  # a plain stand-in module: give it placeholders
    for name in names:  # importlib.util.find_spec (transformers asks it) needs a spec
        if sys.modules[name].__spec__ is None:
            sys.modules[name].__spec__ = importlib.machinery.ModuleSpec(name, None)
    for name in names[1:]:
        parent, _, child = name.rpartition(".")
        setattr(sys.modules[parent], child, sys.modules[name])
    sys.modules["torchvision.ops.misc"].FrozenBatchNorm2d = _FrozenBatchNorm2d
    sys.modules["torchvision.transforms.functional"].InterpolationMode = _InterpolationMode
    sys.modules["torchvision.transforms"].InterpolationMode = _InterpolationMode
    sys.modules["torchvision"].__version__ = "0.0+stand-in"


@contextlib.contextmanager
def torchvision_stand_in():
    """The stand-in torchvision while timm builds or exports a model, and ``sys.modules`` as it was
    afterwards: a module without ``__spec__`` left there makes ``importlib.util.find_spec("torchvision")``
    raise in every later import that probes for it (transformers does, under LXT)."""
    names = ["torchvision"] + [f"torchvision.{s}" for s in _SUBMODULES]
    before = {name: sys.modules.get(name) for name in names}
    stand_in_torchvision()
    try:
        yield
    finally:
        for name, module in before.items():
            if module is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = module


@dataclasses.dataclass(frozen=True)
class Spec:
    """A timm model as the tests build it: ``image`` is the square input side, ``kwargs`` go to
    ``timm.create_model`` (``img_size`` and friends), ``tokens_change`` says whether the token set
    changes between blocks (window attention, token pooling): Chefer's rollout is refused there."""

    name: str
    image: int
    kwargs: tuple = ()
    tokens_change: bool = False
    token_model: bool = False  # has attention (Softmax over tokens): chefer applies
    #: a function of this module that builds the model from ``kwargs`` (the smallest configuration of a
    #: family whose registered names fix its depths and widths); "" → ``timm.create_model(name, **kwargs)``
    factory: str = ""

    @property
    def family(self) -> str:
        """The architecture family, as the coverage table names it: ``vit``, ``convnext``, ``resnetv2``…"""
        return self.name.split("_")[0]


SPECS = {s.name: s for s in (
    Spec("convnext_atto", 64),
    Spec("vit_tiny_patch16_224", 64, (("img_size", 64),), token_model=True),
    Spec("deit_tiny_patch16_224", 64, (("img_size", 64),), token_model=True),
    Spec("swin_tiny_patch4_window7_224", 64, (("img_size", 64), ("window_size", 4)), tokens_change=True,
         token_model=True),
    Spec("mixer_s16_224", 64, (("img_size", 64),)),
    Spec("poolformer_s12", 64),
    Spec("mobilevit_xxs", 64, tokens_change=True, token_model=True),
    Spec("levit_128s", 64, (("img_size", 64),), tokens_change=True, token_model=True),
    Spec("efficientformer_l1", 224, token_model=True),  # attention only in its last block: 49 fixed tokens
    Spec("resnetv2_50x1_bit", 64),
    Spec("nf_resnet26", 64),
)}

DYNAMO = ("convnext_atto", "vit_tiny_patch16_224", "resnetv2_50x1_bit")
"""The families also exported with ``dynamo=True`` (the issue asks for ConvNeXt, ViT and one more)."""

def tiny_mixer(**kwargs) -> torch.nn.Module:
    """MLP-Mixer: two blocks of width 32 over 8×8 patches."""
    from timm.models.mlp_mixer import MlpMixer

    return MlpMixer(patch_size=8, num_blocks=2, embed_dim=32, **kwargs)


def tiny_poolformer(**kwargs) -> torch.nn.Module:
    """PoolFormer (``poolformer_s12``'s recipe: pooling token mixer, GroupNorm, GELU MLP) at one block per stage."""
    from timm.models.metaformer import GroupNorm1, MetaFormer

    return MetaFormer(depths=(1, 1, 1, 1), dims=(16, 24, 32, 40), downsample_norm=None, mlp_act=torch.nn.GELU,
                      mlp_bias=True, norm_layers=GroupNorm1, layer_scale_init_values=1e-5,
                      res_scale_init_values=None, use_mlp_head=False, **kwargs)


def tiny_bit(**kwargs) -> torch.nn.Module:
    """BiT (``resnetv2_50x1_bit``'s recipe: weight-standardised convs, GroupNorm, fixed stem) at one block per stage."""
    from functools import partial

    from timm.layers import StdConv2d
    from timm.models.resnetv2 import ResNetV2

    return ResNetV2(layers=(1, 1, 1, 1), channels=(128, 128, 128, 128), width_factor=1, stem_chs=32, stem_type="fixed",
                    conv_layer=partial(StdConv2d, eps=1e-8), **kwargs)


def tiny_nf_resnet(**kwargs) -> torch.nn.Module:
    """NF-ResNet (``nf_resnet26``'s recipe: scaled weight-standardised convs, no normalisation) at one block per stage."""
    from timm.models.nfnet import NormFreeNet, _nfres_cfg

    return NormFreeNet(_nfres_cfg(depths=(1, 1, 1, 1), channels=(32, 64, 96, 128)), **kwargs)


def tiny_levit(**kwargs) -> torch.nn.Module:
    """LeViT (subsampling attention between stages) at one block per stage, narrow."""
    from timm.models.levit import Levit

    return Levit(img_size=64, embed_dim=(32, 48, 64), key_dim=8, num_heads=(2, 3, 4), depth=(1, 1, 1), **kwargs)


#: CI's representatives: the smallest configuration of every family of ``SPECS`` (the coverage
#: table's), ten classes, seeded, on the smallest image its architecture takes.
TINY = {s.family: s for s in (
    Spec("vit_tiny_patch16_224", 32, (("img_size", 32), ("patch_size", 8), ("depth", 2), ("num_classes", 10)),
         token_model=True),
    Spec("deit_tiny_patch16_224", 32, (("img_size", 32), ("patch_size", 8), ("depth", 2), ("num_classes", 10)),
         token_model=True),
    Spec("swin_tiny_patch4_window7_224", 32, (("img_size", 32), ("window_size", 4), ("embed_dim", 24),
                                              ("depths", (1, 1)), ("num_heads", (1, 2)), ("num_classes", 10)),
         tokens_change=True, token_model=True),
    Spec("convnext_atto", 32, (("depths", (1, 1, 1, 1)), ("dims", (16, 24, 32, 40)), ("num_classes", 10))),
    Spec("mixer_tiny", 32, (("img_size", 32), ("num_classes", 10)), factory="tiny_mixer"),
    Spec("poolformer_tiny", 32, (("num_classes", 10),), factory="tiny_poolformer"),
    Spec("mobilevit_xxs", 64, (("num_classes", 10),), tokens_change=True, token_model=True),  # its smallest config
    Spec("levit_tiny", 64, (("num_classes", 10),), tokens_change=True, token_model=True, factory="tiny_levit"),
    Spec("efficientformer_l1", 224, (("depths", (1, 1, 1, 1)), ("embed_dims", (16, 24, 32, 48)), ("num_vit", 1),
                                     ("num_classes", 10)), token_model=True),  # 224: its attention's 7×7 grid
    Spec("resnetv2_tiny", 32, (("num_classes", 10),), factory="tiny_bit"),
    Spec("nf_resnet_tiny", 32, (("num_classes", 10),), factory="tiny_nf_resnet"),
)}

_cache: pathlib.Path | None = None
EXPORT_SECONDS: dict[str, float] = {}
"""Seconds spent exporting each model in this process (cached files do not count)."""


def cache_dir() -> pathlib.Path:
    global _cache
    if _cache is None:
        _cache = pathlib.Path(os.environ.get("AGF_TIMM_CACHE") or tempfile.mkdtemp(prefix="agf-timm-"))
        _cache.mkdir(parents=True, exist_ok=True)
    return _cache


def build(spec: Spec, seed: int = 0) -> torch.nn.Module:
    """The timm model with seeded random weights, in eval mode."""
    with torchvision_stand_in():
        return _build(spec, seed)


def _build(spec: Spec, seed: int) -> torch.nn.Module:
    import timm

    torch.manual_seed(seed)
    if spec.factory:
        model = globals()[spec.factory](**dict(spec.kwargs)).eval()
    else:
        model = timm.create_model(spec.name, pretrained=False, **dict(spec.kwargs)).eval()
    with torch.no_grad():  # zero_init_last (BiT; NF-ResNet's gains) zeroes each block's last conv: every residual
        for module in model.modules():  # branch would be dead, and Grad-CAM at the last conv exactly zero
            if isinstance(module, torch.nn.Conv2d) and not module.weight.abs().sum():
                torch.nn.init.kaiming_normal_(module.weight)
                module.weight.mul_(0.1)  # a trained network's late branches are small, not zero
            gain = getattr(module, "gain", None)  # NF-ResNet's ScaledStdConv2d: gain_init 0 on each last conv
            if isinstance(gain, torch.nn.Parameter) and not gain.abs().sum():
                gain.fill_(1.0)
    _calibrate_head(model, spec.image)
    return model


@torch.no_grad()
def _calibrate_head(model: torch.nn.Module, image: int) -> None:
    """Scale the classifier so the logits spread with a standard deviation of about 3: several timm
    heads start at zero (ViT, Mixer: ``head`` zero-initialised), which would make every class score
    and every explanation zero."""
    head = model.get_classifier()
    if isinstance(head, torch.nn.Sequential):
        head = [m for m in head if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))][-1]
    if not isinstance(head, (torch.nn.Linear, torch.nn.Conv2d)):  # LeViT: BatchNorm + Linear (+ distillation)
        heads = [m for m in model.modules() if isinstance(m, torch.nn.Linear)
                 and m.out_features == model.num_classes]
    else:
        heads = [head]
    distilled = getattr(getattr(model, "head_dist", None), "linear", getattr(model, "head_dist", None))
    if isinstance(distilled, torch.nn.Linear) and all(distilled is not h for h in heads):
        heads.append(distilled)  # DeiT/LeViT distillation heads: averaged with the class head in eval
    generator = torch.Generator().manual_seed(1)
    for layer in heads:
        if not layer.weight.abs().sum():
            layer.weight.normal_(0, 0.02, generator=generator)
    logits = model(torch.randn(2, 3, image, image, generator=generator))
    scale = 3.0 / max(float(logits.std()), 1e-6)
    for layer in heads:
        layer.weight.mul_(scale)
        if layer.bias is not None:
            layer.bias.mul_(scale)


def export(spec: Spec, dynamo: bool = False) -> onnx.ModelProto:
    """The model exported at opset 17 with a dynamic batch (input ``x``), from the cache if there."""
    return onnx.load(export_path(spec, dynamo))


def export_path(spec: Spec, dynamo: bool = False) -> str:
    """The cached ``.onnx`` file of :func:`export`, written on first use."""
    key = hashlib.sha1(repr(spec.kwargs).encode()).hexdigest()[:8]  # str hashes change per process
    path = cache_dir() / f"{spec.name}-{spec.image}-{key}-{'dynamo' if dynamo else 'ts'}.onnx"
    if not path.exists():
        with torchvision_stand_in():  # the dynamo exporter probes torchvision for ops to register
            _export(spec, dynamo, path)
    return str(path)


def _export(spec: Spec, dynamo: bool, path: pathlib.Path) -> None:
    """Build and export ``spec`` to ``path`` (through a partial file: never a half-written one)."""
    model = _build(spec, 0)
    example = torch.randn(2, 3, spec.image, spec.image)
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if dynamo:
            # the exporter looks for torchvision's ops to register and logs the stand-in's failure
            logging.getLogger("torch.onnx._internal.exporter._registration").setLevel(logging.CRITICAL)
            program = torch.onnx.export(model, (example,), dynamo=True, input_names=["x"], opset_version=17,
                                        dynamic_shapes={"x": {0: torch.export.Dim("N")}}, verbose=False,
                                        optimize=True)
            proto = program.model_proto
        else:
            buffer = io.BytesIO()
            torch.onnx.export(model, (example,), buffer, dynamo=False, input_names=["x"], output_names=["y"],
                              dynamic_axes={"x": {0: "N"}, "y": {0: "N"}}, opset_version=17)
            proto = onnx.load_from_string(buffer.getvalue())
    EXPORT_SECONDS[path.stem] = time.perf_counter() - start
    partial = path.with_suffix(".partial")
    onnx.save(proto, partial)
    partial.replace(path)  # never a half-written file in the cache
