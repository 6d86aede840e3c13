"""Errors the compiler raises; the CLI turns each into a message and a non-zero exit code."""

from __future__ import annotations

from collections.abc import Mapping, Sequence


class CompileError(Exception):
    """The model cannot be compiled; the message names the file, node or argument at fault."""

    exit_code = 1


class UnsupportedOpsError(CompileError):
    """The model contains ops without a rule; lists every such op type with its node names."""

    exit_code = 2

    def __init__(self, unsupported: Mapping[str, Sequence[str]]) -> None:
        self.unsupported = {op: list(nodes) for op, nodes in sorted(unsupported.items())}
        lines = [f"  {op} ({len(nodes)}): {', '.join(nodes)}" for op, nodes in self.unsupported.items()]
        super().__init__("unsupported ops on the path from the image to the logits:\n" + "\n".join(lines)
                         + "\n`agf-onnx rules` lists the supported ops.")
