"""The ``Plan``: what the compiler found in a model before emitting anything (``planning.plan``
makes it; the compiler and the methods' map functions read it)."""

from __future__ import annotations

from dataclasses import dataclass

import onnx

from ..errors import CompileError
from .graph import GraphView
from .text import TokenInput
from .tokens import TokenGrid


@dataclass
class Plan:
    """What the compiler found in the model before emitting anything."""

    graph: GraphView
    image: str  # the explained input tensor: the image input, or a text model's embedding sum E
    logits: str
    start: str  # the data input X of the top linear layer, where relevance starts
    path: list[onnx.NodeProto]  # nodes from the image to the logits, in topological order
    data: set[str]  # tensors that depend on the image
    kinds: dict[str, str]  # node name → relevance rule kind (nodes below the start)
    first_layers: set[str]
    channels_last: bool
    unsupported: dict[str, list[str]]  # op type → node names (empty unless planned with strict=False)
    layer: str | None = None  # the explained layer's output tensor, for layer methods (Grad-CAM)
    layer_grid: TokenGrid | None = None  # where the layer's patch tokens lie, when it is a token tensor
    tokens: TokenInput | None = None  # a text model's inputs: the map is per token, explained at E

    @property
    def image_size(self) -> tuple[int, int]:
        """The image's height and width, whatever its layout."""
        if self.tokens is not None:
            raise CompileError("internal error: a text model has no image size")
        shape = self.graph.shape(self.image)
        return (shape[1], shape[2]) if self.channels_last else (shape[2], shape[3])

    @property
    def map_size(self) -> tuple[int, ...]:
        """The heatmap's axes after the batch: ``(H, W)`` per pixel, ``(T,)`` per token."""
        return (self.graph.shape(self.image)[1],) if self.tokens is not None else self.image_size

    @property
    def heatmap_shape(self) -> tuple[int, ...]:
        """``heatmap``'s shape after the batch: ``[1, H, W]`` for an image, ``[T]`` for a text."""
        return self.map_size if self.tokens is not None else (1, *self.map_size)
