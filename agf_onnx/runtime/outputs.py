"""Where ``agf-onnx explain`` puts each image's outcome, whichever engine computed it.

``files`` (the default): per image ``<stem>_agf.png`` (the photo, then one overlay per explained
class) and ``<stem>_heatmap.npy``, then ``results.json`` with one entry per image and, for
several images, ``index.html`` (for a folder or several images). For runs too large for a file per image, ``npz-shards`` and
``parquet`` write the maps in shards of ``shard_size`` images (``maps-00000.npz`` or
``maps-00000.parquet``: the images' run index, path, explained classes and their probabilities,
the heatmaps ``[n, K, H, W]``, notes, and a self-supervised model's ``ssl_target`` and
``ssl_neighbour``), and ``results.json`` lists the shards and the failed
images only, so that memory stays bounded by one shard whatever the number of images.

Outcomes may arrive in any order (the Ray engine streams them as its workers finish): each is
keyed by its index in the run, a repeated index (a retried task) is dropped, file names are fixed
from the input order up front, and ``results.json`` lists images in input order.
"""

from __future__ import annotations

import json
import pathlib
from collections.abc import Sequence

import numpy as np

from .explain import ExplainError, ImageExplanation
from .plots import DEFAULT_COLOUR_MAP
from .report import ImageResult, unique_stem, write_gallery, write_image_outputs, write_results

OUTPUT_FORMATS = ("files", "npz-shards", "parquet")


class ExplainOutputs:
    """Writes each image's outcome as it arrives; ``close`` writes ``results.json`` (and the gallery)."""

    def __init__(self, out: pathlib.Path, sources: Sequence[str], output_format: str = "files",
                 shard_size: int = 1024, cmap: str = DEFAULT_COLOUR_MAP) -> None:
        if output_format not in OUTPUT_FORMATS:
            raise ExplainError(f"--output-format {output_format}: expected one of {', '.join(OUTPUT_FORMATS)}")
        if output_format == "parquet":
            try:
                import pyarrow  # noqa: F401
            except ImportError:
                raise ExplainError("--output-format parquet needs pyarrow: pip install 'agf-onnx[ray]'") from None
        self.out, self.format, self.shard_size, self.count = out, output_format, shard_size, len(sources)
        self.cmap = cmap
        self.seen = np.zeros(len(sources), bool)
        self.explained = 0
        self.failed: list[dict] = []
        if output_format == "files":
            taken: set[str] = set()
            # names fixed by input order, so that they do not depend on the order outcomes arrive in
            self.stems = [unique_stem(pathlib.Path(source), taken) for source in sources]
            self.results = [ImageResult(str(source)) for source in sources]
        else:
            self.pending: list[ImageExplanation] = []
            self.shards: list[dict] = []

    def add(self, outcome: ImageExplanation) -> bool:
        """Write one image's outcome; False (and nothing written) when its index was seen already."""
        if self.seen[outcome.index]:
            return False
        self.seen[outcome.index] = True
        if outcome.error is not None:
            self.failed.append({"image": outcome.source, "error": outcome.error, "notes": outcome.notes})
        else:
            self.explained += 1
        if self.format == "files":
            result = self.results[outcome.index]
            result.notes, result.error = outcome.notes, outcome.error
            explanation = outcome.explanation
            if explanation is not None:
                write_image_outputs(explanation, 0, self.out, self.stems[outcome.index], result, cmap=self.cmap)
                if explanation.ssl_targets is not None:  # a self-supervised model (--ssl-bank): its t and L_N
                    result.ssl_target = int(explanation.ssl_targets[0])
                    result.ssl_neighbour = int(explanation.ssl_neighbours[0])
        elif outcome.error is None:
            self.pending.append(outcome)
            if len(self.pending) >= self.shard_size:
                self._write_shard()
        return True

    def open(self, settings: dict) -> pathlib.Path:
        """A ``results.json`` that says the run is under way (``"complete": false``), written before
        the first image: a folder whose run was killed says so even when nothing else could be written."""
        return self._write_results(settings, complete=False)

    def abandon(self, settings: dict, reason: str) -> pathlib.Path:
        """``results.json`` for the images done so far, marked ``"complete": false`` with ``reason``
        (an interrupted run: Ctrl-C, a failed engine)."""
        if self.format != "files" and self.pending:
            self._write_shard()
        return self._write_results({**settings, "interrupted": reason}, complete=False)

    def close(self, settings: dict, title: str, gallery: bool = True) -> pathlib.Path:
        """``results.json`` (``"complete": true``), and in ``files`` format the ``index.html`` gallery when ``gallery``."""
        missing = np.flatnonzero(~self.seen)
        if len(missing):  # an engine that lost images must not pass for a complete run
            raise ExplainError(f"{len(missing)} image(s) got no result, e.g. index {int(missing[0])}")
        if self.format != "files" and self.pending:
            self._write_shard()
        path = self._write_results(settings, complete=True)
        if self.format == "files" and gallery:
            write_gallery(self.out, self.results, title)
        return path

    def _write_results(self, settings: dict, complete: bool) -> pathlib.Path:
        """``results.json``: in ``files`` format one entry per image seen so far (all of them when
        complete), else the shards written so far and the failed images."""
        if self.format == "files":
            done = self.results if complete else [r for r, seen in zip(self.results, self.seen) if seen]
            return write_results(self.out, done, settings, complete)
        path = self.out / "results.json"
        path.write_text(json.dumps({"complete": complete, "settings": settings, "format": self.format,
                                    "images": self.count, "explained": self.explained, "shards": self.shards,
                                    "failed": self.failed}, indent=2))
        return path

    def _write_shard(self) -> None:
        """One shard of maps, rows in input order within it."""
        rows = sorted(self.pending, key=lambda outcome: outcome.index)
        self.pending = []
        explanations = [outcome.explanation for outcome in rows]
        columns = {
            "index": np.array([outcome.index for outcome in rows], np.int64),
            "image": np.array([outcome.source for outcome in rows]),
            "classes": np.concatenate([e.targets for e in explanations]).astype(np.int64),
            "heatmaps": np.concatenate([e.heatmaps for e in explanations]).astype(np.float32),
            "notes": np.array(["\n".join(outcome.notes) for outcome in rows]),
        }
        if explanations[0].probabilities is not None:
            columns["probabilities"] = np.concatenate([np.take_along_axis(e.probabilities, e.targets, 1)
                                                       for e in explanations]).astype(np.float32)
        if explanations[0].ssl_targets is not None:  # a self-supervised model: its t and bank neighbour
            columns["ssl_target"] = np.concatenate([e.ssl_targets for e in explanations]).astype(np.int64)
            columns["ssl_neighbour"] = np.concatenate([e.ssl_neighbours for e in explanations]).astype(np.int64)
        name = f"maps-{len(self.shards):05d}.{'npz' if self.format == 'npz-shards' else 'parquet'}"
        if self.format == "npz-shards":
            np.savez(self.out / name, **columns)
        else:
            _write_parquet(self.out / name, columns)
        self.shards.append({"file": name, "images": len(rows)})


def _write_parquet(path: pathlib.Path, columns: dict[str, np.ndarray]) -> None:
    """Heatmaps as Arrow's fixed-shape tensor column (``pyarrow``: ``column.to_numpy_ndarray()``)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    arrays = {}
    for name, values in columns.items():
        if values.ndim == 1:
            arrays[name] = pa.array(values)
        else:
            tensor_type = pa.fixed_shape_tensor(pa.from_numpy_dtype(values.dtype), values.shape[1:])
            storage = pa.FixedSizeListArray.from_arrays(pa.array(values.reshape(-1)), int(np.prod(values.shape[1:])))
            arrays[name] = pa.ExtensionArray.from_storage(tensor_type, storage)
    pq.write_table(pa.table(arrays), path)


def read_shard(path: str | pathlib.Path) -> dict[str, np.ndarray]:
    """A shard's columns as NumPy arrays, from either format."""
    path = pathlib.Path(path)
    if path.suffix == ".npz":
        with np.load(path) as shard:
            return {name: shard[name] for name in shard.files}
    import pyarrow.parquet as pq

    table = pq.read_table(path)
    return {name: (column.combine_chunks().to_numpy_ndarray() if hasattr(column.type, "shape")
                   else column.to_numpy(zero_copy_only=False))
            for name, column in zip(table.column_names, table.columns)}
