"""Text classifiers: token-id inputs, the embedding sum the explanation stops at, and the
deployed forms' embedding op (spec "Token-id inputs (text classifiers)").

A BERT-family classifier reads ``input_ids`` (int [N, T]), an attention mask and often token
type ids. The first float tensors that depend on the ids are the embedding sum
``S = word[ids] + position[pos] + type[types]`` and its LayerNorm; everything above them is a
token model (``[N, T, C]``) as a ViT is above its patch embedding. The compiler explains at

    E = LayerNorm(S)      (the embeddings' output; S itself where no LayerNormalization reads it)

both streams stop there, and the map is per token, ``Σ_c`` of the method's per-element value at
E, with padding tokens (attention mask 0) exactly 0.

Why after the LayerNorm and not at S: a LayerNorm is invariant to the scale of its input
(``LN(αS) = LN(S)`` up to its ε), so ``Σ_c S ⊙ ∇S = 0`` (the directional derivative along S):
gradient × input at S is 0 up to rounding and the LayerNorm's ε for every token, and Integrated Gradients on
the straight path from 0 to S sees a constant function after its first steps. At E the
gradient methods mean what they mean for an image, and the standard tooling agrees (Captum's
BERT tutorial attributes at ``model.bert.embeddings``, whose output is after this LayerNorm).
Relevance passes through a LayerNorm unchanged (spec "Normalisations"), so AGF and the LRP family
give the same map at S and at E.

Inputs are recognised by their role, not their names:

- the **ids**: an integer ``[N, T]`` input that indexes an embedding Gather (a constant
  ``[rows, C]`` float table); where several do (token types index a table too) the one whose
  table has the most rows;
- the **mask**: the integer or boolean ``[N, T]`` input that reaches the logits without
  indexing a table (it enters the attention scores); 1 = a token, 0 = padding;
- every other per-sample input (token types, explicit positions) passes through unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import onnx
from onnx import TensorProto, helper

from ..errors import CompileError
from .graph import GraphView

#: Integer and boolean element types that token ids and masks come in.
_ID_TYPES = (TensorProto.INT64, TensorProto.INT32)
_MASK_TYPES = (*_ID_TYPES, TensorProto.BOOL, TensorProto.FLOAT)
#: Ops that move the ids on the way to the table without changing them.
_ID_MOVES = ("Cast", "Identity", "Reshape", "Flatten", "Squeeze", "Unsqueeze")


@dataclass(frozen=True)
class TokenInput:
    """A text model's inputs as the compiler sees them.

    ``ids``: the token-id input (int [N, T]); ``embedding``: E, the normalised embedding sum
    ``[N, T, C]`` the streams stop at; ``table``: the word-embedding table (``[vocab, C']``); ``mask``: the
    attention-mask input (``None`` when the model has none: every token counts); ``others``: the
    further per-sample inputs (token types…), which pass through."""

    ids: str
    embedding: str
    table: str
    mask: str | None
    others: tuple[str, ...] = ()

    @property
    def per_sample(self) -> tuple[str, ...]:
        """The inputs that a copy of the explained path must see repeated with E (the mask; the ids
        and token types, whose shapes size the mask in dynamo's exports)."""
        return tuple(name for name in (self.ids, self.mask, *self.others) if name)

    def renamed(self, names: dict[str, str]) -> TokenInput:
        """The same roles under ``names`` (a copy of the path that reads repeated inputs)."""
        return replace(self, ids=names.get(self.ids, self.ids), embedding=names.get(self.embedding, self.embedding),
                       mask=names.get(self.mask, self.mask) if self.mask else None,
                       others=tuple(names.get(o, o) for o in self.others))


def _is_token_shaped(graph: GraphView, name: str, types: tuple[int, ...]) -> bool:
    return graph.dtypes.get(name) in types and len(graph.shapes.get(name, ())) == 2


def _embedding_gathers(graph: GraphView, tensor: str) -> list[onnx.NodeProto]:
    """The Gathers of a constant 2-D float table that ``tensor`` indexes (through casts and reshapes)."""
    found, pending = [], [tensor]
    while pending:
        current = pending.pop()
        for reader in graph.consumers.get(current, []):
            if reader.op_type == "Gather" and reader.input[1] == current and graph.is_constant(reader.input[0]) \
                    and len(graph.shape(reader.input[0])) == 2 and graph.dtypes.get(reader.input[0]) == TensorProto.FLOAT:
                found.append(reader)
            elif reader.op_type in _ID_MOVES and reader.input[0] == current:
                pending.append(reader.output[0])
    return found


def embedding_sum(graph: GraphView, word: str) -> str:
    """E: the word embeddings ``word`` plus the chain of Adds that sums the other embeddings into
    them (position, token type), normalised by the LayerNormalization that reads the sum where
    one does (see the module's docstring for why after it)."""
    tensor = word
    while len(readers := graph.consumers.get(tensor, [])) == 1 and readers[0].op_type == "Add" \
            and graph.shape(readers[0].output[0]) == graph.shape(tensor):
        tensor = readers[0].output[0]
    readers = graph.consumers.get(tensor, [])
    if len(readers) == 1 and readers[0].op_type == "LayerNormalization":
        tensor = readers[0].output[0]
    return tensor


def find_token_input(graph: GraphView, logits: str, ids: str | None = None) -> TokenInput | None:
    """The model's token input (``TokenInput``), or None when it has no integer ``[N, T]`` input.

    ``ids``: the token-id input, when the caller names it (``--image``). Raises ``CompileError``
    when integer ``[N, T]`` inputs exist but none indexes an embedding table."""
    candidates = [name for name in graph.inputs if _is_token_shaped(graph, name, _ID_TYPES)]
    if ids is not None:
        candidates = [ids] if ids in candidates else []
    if not candidates:
        return None
    tables = {name: _embedding_gathers(graph, name) for name in candidates}
    indexing = {name: gathers for name, gathers in tables.items() if gathers}
    fused = [node.name for node in graph.nodes if node.op_type == "EmbedLayerNormalization"]
    if not indexing and fused:
        raise CompileError(f"the token ids feed com.microsoft.EmbedLayerNormalization node '{fused[0]}' (ONNX Runtime's "
                           "fused embeddings): decompose it first (agf_onnx.compiler.text.decompose_embed_layer_normalization), "
                           "or compile the model as exported, before ONNX Runtime's transformer optimiser")
    if not indexing:
        raise CompileError(f"the integer [N, T] input{'s' if len(candidates) > 1 else ''} {', '.join(candidates)} "
                           "index no embedding table: looked for a Gather of a constant float [vocabulary, hidden] "
                           "table by the token ids (a text model's word embedding)")

    def rows(name: str) -> int:
        return max(graph.shape(g.input[0])[0] for g in indexing[name])

    ranked = sorted(indexing, key=rows, reverse=True)
    if len(ranked) > 1 and rows(ranked[0]) == rows(ranked[1]):
        raise CompileError(f"cannot tell the token ids from {ranked[0]} and {ranked[1]}: both index embedding tables "
                           f"of {rows(ranked[0])} rows; pass --image NAME (the token-id input)")
    chosen = ranked[0]
    word = max(indexing[chosen], key=lambda g: graph.shape(g.input[0])[0])
    embedding = embedding_sum(graph, word.output[0])
    above = graph.ancestors([logits])
    per_sample = [name for name in graph.inputs if name != chosen and _is_token_shaped(graph, name, _MASK_TYPES)
                  and any(reader.name in above for reader in graph.consumers.get(name, []))]
    masks = [name for name in per_sample if not _embedding_gathers(graph, name)]
    if len(masks) > 1:
        raise CompileError(f"cannot tell the attention mask among the [N, T] inputs {', '.join(masks)}: none of them "
                           "indexes an embedding table")
    mask = masks[0] if masks else None
    return TokenInput(chosen, embedding, word.input[0], mask, tuple(n for n in per_sample if n != mask))


def check_sequence_static(graph: GraphView, tokens: TokenInput) -> int:
    """The static sequence length T; refuses a dynamic one, naming the option that fixes it."""
    length = graph.shape(tokens.ids)[1]
    if length is None:
        raise CompileError(f"the sequence axis of the token input '{tokens.ids}' is dynamic: the compiled model "
                           f"explains sequences of one length T (shorter ones are padded); pass --input-shape "
                           f"{tokens.ids}=N,T (the other [N, T] inputs follow)")
    return length


# -- ONNX Runtime's fused embedding ---------------------------------------------------------------
#: ``com.microsoft.EmbedLayerNormalization``'s default epsilon (ONNX Runtime's contrib op schema).
EMBED_LAYER_NORM_EPSILON = 1e-12


def embed_layer_normalization(node: onnx.NodeProto) -> list[onnx.NodeProto]:
    """Standard ops computing ONNX Runtime's ``EmbedLayerNormalization`` (its transformer
    optimiser's fusion of BERT's embeddings): inputs ``input_ids, segment_ids, word_embedding,
    position_embedding, segment_embedding, gamma, beta, mask, position_ids`` (segment, mask and
    position ids optional), outputs ``output, mask_index, embedding_sum``::

        S = word[ids] + position[position_ids or 0…T−1] (+ segment[segment_ids])
        output = LayerNormalization(S, γ, β, ε)   mask_index = int32 Σ_t mask   embedding_sum = S

    The nodes keep the op's tensor names for its inputs and outputs, so they replace it in place."""
    inputs = list(node.input) + [""] * (9 - len(node.input))
    ids, segments, words, positions, segment_table, gamma, beta, mask, position_ids = inputs
    outputs = list(node.output) + [""] * (3 - len(node.output))
    epsilon = next((a.f for a in node.attribute if a.name == "epsilon"), EMBED_LAYER_NORM_EPSILON)
    base = node.name or "EmbedLayerNormalization"
    nodes: list[onnx.NodeProto] = []

    def add(op: str, args: list[str], output: str | None = None, **attributes) -> str:
        output = output or f"{base}/{op}_{len(nodes)}"
        nodes.append(helper.make_node(op, args, [output], name=f"{base}/{op}_{len(nodes)}", **attributes))
        return output

    def ints(*values: int) -> str:
        return add("Constant", [], value=helper.make_tensor(f"{base}/c{len(nodes)}", TensorProto.INT64,
                                                            [len(values)], list(values)))

    def scalar(value: int) -> str:
        return add("Constant", [], value=helper.make_tensor(f"{base}/s{len(nodes)}", TensorProto.INT64, [], [value]))

    summed = add("Gather", [words, ids])
    if position_ids:
        position = add("Gather", [positions, position_ids])
    else:  # positions 0 … T−1, the same for every sequence
        length = add("Slice", [add("Shape", [ids]), ints(1), ints(2)])
        position = add("Slice", [positions, ints(0), length, ints(0)])
    summed = add("Add", [summed, position])
    if segments and segment_table:
        summed = add("Add", [summed, add("Gather", [segment_table, segments])])
    if outputs[2]:
        summed = add("Identity", [summed], outputs[2])
    add("LayerNormalization", [summed, gamma, beta], outputs[0], axis=-1, epsilon=epsilon)
    if outputs[1]:  # the number of tokens per sequence: Σ_t mask, or T where there is no mask
        if mask:
            present = mask
        else:
            present = add("Add", [add("Mul", [ids, scalar(0)]), scalar(1)])
        add("ReduceSum", [add("Cast", [present], to=TensorProto.INT32), ints(1)], outputs[1], keepdims=0)
    return nodes


def decompose_embed_layer_normalization(model: onnx.ModelProto) -> onnx.ModelProto:
    """``model`` with every ``com.microsoft.EmbedLayerNormalization`` replaced by its standard-op
    decomposition (``embed_layer_normalization``), in place; the forward then runs those ops."""
    graph = model.graph
    rewritten = []
    for node in graph.node:
        if node.domain == "com.microsoft" and node.op_type == "EmbedLayerNormalization":
            rewritten.extend(embed_layer_normalization(node))
        else:
            rewritten.append(node)
    del graph.node[:]
    graph.node.extend(rewritten)
    return model
