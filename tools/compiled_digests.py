"""Digests of compiled models, to show a refactor changed no graph: every method (and the
modifiers, top-K and the options that replicate a path) compiled for a small CNN and a small ViT
(`tests/models.py`, `tests/token_models.py`, seeded weights), each compiled file's SHA-256 and a
second digest with node and intermediate tensor names replaced by their position and without the
``agf_onnx.spec`` metadata entry (the record of the compile options, added by issue 21's typed
spec): equal when two graphs differ only in naming and that record; and a third, ``structure``,
that also ignores node order, ``value_info``, unread nodes and a computation written twice (each
node named by what it computes, ``structure()``): equal when two graphs compute the same tensors
with the same ops.

    python tools/compiled_digests.py --models /tmp/digest_models --write before.json   # on the old commit
    python tools/compiled_digests.py --models /tmp/digest_models --compare before.json # on the new one

``--models`` keeps the exported originals, so that both runs compile the same files (an export
is not guaranteed byte-stable across torch versions). Exits 1 when a digest differs.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys

import onnx

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import agf_onnx  # noqa: E402

#: (name, method, compile options): each method as the CLI's defaults compile it, then what wraps it.
CASES = [(method, method, {}) for method in ("agf", "gradient", "gradient-x-input", "gradcam", "integrated-gradients", "smoothgrad", "lrp",
                                              "lrp-ab", "clrp", "sglrp", "rap", "fullgrad", "chefer")] + [
    ("agf+top3", "agf", {"top_k": 3}),
    ("agf+smooth4", "agf", {"modifiers": "smooth=4"}),
    ("gradient+smooth4+top2", "gradient", {"modifiers": "smooth=4", "top_k": 2}),
    ("lrp+contrast", "lrp", {"modifiers": "contrast=others"}),
    ("gxi+contrast-softmax", "gradient-x-input", {"modifiers": "contrast=softmax"}),
    ("ig+top2", "integrated-gradients", {"top_k": 2}),
    ("smoothgrad+top2", "smoothgrad", {"top_k": 2}),
]


def originals(folder: str) -> dict[str, str]:
    """The two exported classifiers, written once into ``folder``."""
    paths = {"cnn": os.path.join(folder, "cnn.onnx"), "vit": os.path.join(folder, "vit.onnx")}
    if all(os.path.exists(p) for p in paths.values()):
        return paths
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
    from tests import models, token_models

    os.makedirs(folder, exist_ok=True)
    onnx.save(models.export(models.seeded(models.VGGish())), paths["cnn"])
    onnx.save(token_models.export(token_models.vit()), paths["vit"])
    return paths


def renamed(model: onnx.ModelProto) -> bytes:
    """The model with node names and every tensor name that is not a graph input, output or
    initializer replaced by its first position, and without the ``agf_onnx.spec`` record, so that
    naming alone does not change the bytes."""
    graph = model.graph
    kept = {v.name for v in graph.input} | {v.name for v in graph.output} | {t.name for t in graph.initializer}
    names: dict[str, str] = {}
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    for index, node in enumerate(copy.graph.node):
        node.name = f"n{index}"
        for field in (node.input, node.output):
            for i, name in enumerate(field):
                if name and name not in kept:
                    field[i] = names.setdefault(name, f"t{len(names)}")
    for info in copy.graph.value_info:
        info.name = names.get(info.name, info.name)
    kept_props = [p for p in copy.metadata_props if p.key != "agf_onnx.spec"]
    del copy.metadata_props[:]
    copy.metadata_props.extend(kept_props)
    return copy.SerializeToString(deterministic=True)


def structure(model: onnx.ModelProto) -> bytes:
    """The graph as a set of nodes, each named by what it computes: a tensor's name becomes a
    hash of its producer's op type, domain, attributes, output position and the names of its inputs
    (graph inputs keep their names, initializers are named by their contents), so that neither
    naming nor node order nor ``value_info`` changes the bytes. Nodes whose outputs nothing reads
    are left out (a pass that drops them changes no result), and a computation written twice (the
    same op on the same inputs) counts once: both copies compute the same values."""
    graph = model.graph
    names = {v.name: f"input:{v.name}" for v in graph.input}
    for tensor in graph.initializer:
        anonymous = onnx.TensorProto()
        anonymous.CopyFrom(tensor)
        anonymous.name = ""
        names[tensor.name] = "const:" + hashlib.sha256(anonymous.SerializeToString(deterministic=True)).hexdigest()
    needed = {o.name for o in graph.output}
    for node in reversed(graph.node):
        if needed.intersection(node.output):
            needed.update(node.input)
    lines = []
    for node in graph.node:  # topological order: a node's inputs are named before it
        if not needed.intersection(node.output):
            continue
        attributes = b"".join(a.SerializeToString(deterministic=True) for a in sorted(node.attribute, key=lambda a: a.name))
        key = hashlib.sha256("|".join([node.domain, node.op_type, *(names.get(i, i) for i in node.input)]).encode()
                             + attributes).hexdigest()
        for index, output in enumerate(node.output):
            if output:
                names[output] = f"{key}:{index}"
        lines.append(key)
    lines += sorted(f"output:{o.name}={names.get(o.name, o.name)}" for o in graph.output)
    lines += sorted(f"meta:{p.key}={p.value}" for p in model.metadata_props if p.key != "agf_onnx.spec")
    return "\n".join(sorted(set(lines))).encode()


def options_for(options: dict) -> dict:
    """The compile keyword arguments of a case (modifiers parsed as the CLI parses them)."""
    options = dict(options)
    if "modifiers" in options:
        text = options.pop("modifiers")
        key, _, value = text.partition("=")
        from agf_onnx.compiler.modifiers import Modifiers
        options["modifiers"] = Modifiers(smooth=int(value)) if key == "smooth" else Modifiers(contrast=value)
    return options


def digests(folder: str) -> dict[str, dict[str, str]]:
    result = {}
    for model_name, path in originals(folder).items():
        for case, method, options in CASES:
            try:
                compiled = agf_onnx.compile(path, method=method, **options_for(options))
            except agf_onnx.CompileError as error:
                result[f"{model_name}/{case}"] = {"refused": str(error)}
                continue
            result[f"{model_name}/{case}"] = {
                "sha256": hashlib.sha256(compiled.SerializeToString(deterministic=True)).hexdigest(),
                "names_aside": hashlib.sha256(renamed(compiled)).hexdigest(),
                "structure": hashlib.sha256(structure(compiled)).hexdigest()}
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", required=True, help="folder for the exported originals (reused)")
    group = parser.add_mutually_exclusive_group(required=True)
    group.add_argument("--write", help="write the digests to this JSON file")
    group.add_argument("--compare", help="compare with the digests in this JSON file")
    args = parser.parse_args()
    now = digests(args.models)
    if args.write:
        with open(args.write, "w") as f:
            json.dump(now, f, indent=1)
        print(f"wrote {len(now)} digests to {args.write}")
        return 0
    with open(args.compare) as f:
        before = json.load(f)
    differ = 0
    for case in sorted(set(before) | set(now)):
        old, new = before.get(case), now.get(case)
        if old == new:
            verdict = "identical"
        elif old and new and old.get("names_aside") and old.get("names_aside") == new.get("names_aside"):
            verdict = "naming/spec record only"
        elif old and new and old.get("structure") and old.get("structure") == new.get("structure"):
            verdict = "naming and node order only"
        else:
            verdict, differ = "DIFFERENT", differ + 1
        print(f"{case:32} {verdict}")
    print(f"{len(now)} cases, {differ} different beyond naming")
    return 1 if differ else 0


if __name__ == "__main__":
    sys.exit(main())
