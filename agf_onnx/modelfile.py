"""Writing and sizing model files without a second copy of the weights in memory.

``onnx.save`` serialises the whole model into one ``bytes`` object (protobuf's upb backend first
encodes into its arena, then copies into Python): a model's file costs twice its weights in memory
on top of the model itself. Here the file is written piece by piece instead:

* **one file** (the model under protobuf's 2 GB limit): the model without its initializers, then
  each initializer as a ``ModelProto`` of its own. Protobuf parses concatenated messages as one
  (a repeated field's elements append, an embedded message merges), so the file reads back as
  the same model; only one tensor is encoded at a time.
* **external data** (asked for, or the model over the limit): each large tensor's bytes go to
  ``PATH.data`` (offsets aligned as ``onnx.save`` aligns them, so ONNX Runtime can map them), and
  the model file refers to them. The model in memory is left as it was (``onnx.save`` empties
  every tensor it moves out).

Either way the files appear all at once (staged beside the target, then renamed): no
half-written file on failure.
"""

from __future__ import annotations

import os
import shutil
import stat
import tempfile
from collections.abc import Iterator

import numpy as np
import onnx
from onnx import numpy_helper

from .errors import CompileError

#: Above this, a model is written with external data (protobuf refuses to encode 2 GB; margin for
#: the rest of the graph).
PROTOBUF_LIMIT = 2**31 - 2**26
#: Tensors of at least this many bytes go to the external data file (``onnx.save``'s threshold).
EXTERNAL_THRESHOLD = 1024
#: ``onnx.save``'s alignment: tensors of 1 MiB or more start at a multiple of 64 KiB (Windows'
#: mapping granularity; 4 KiB pages elsewhere), so that ONNX Runtime can memory-map them.
_ALIGN_THRESHOLD, _ALIGNMENT = 1 << 20, 1 << 16


def load(model_or_path: onnx.ModelProto | str | os.PathLike) -> onnx.ModelProto:
    """Read a model file (external data included) or copy a ``ModelProto``.

    After: a ``ModelProto`` whose tensors hold their data in memory. A file is read one tensor at
    a time (``modelfile.read``): never the whole file's bytes beside the model. A ``ModelProto``
    is copied (the compiler extends it in place), which costs its weights once more: pass the path.
    """
    if isinstance(model_or_path, onnx.ModelProto):
        model = onnx.ModelProto()
        model.CopyFrom(model_or_path)
        for tensor in model.graph.initializer:
            if tensor.data_location == onnx.TensorProto.EXTERNAL:
                raise CompileError(f"initializer '{tensor.name}' has external data; pass the model's "
                                   "file path instead of a loaded ModelProto")
        return model
    path = os.fspath(model_or_path)
    if not os.path.isfile(path):
        raise CompileError(f"{path}: no such model file")
    try:
        return read(path)
    except Exception as error:  # protobuf raises several unrelated types on bad files
        raise CompileError(f"{path}: not a readable ONNX model ({error})") from error


def uses_external_data(path: str | os.PathLike) -> bool:
    """Whether the model file at ``path`` keeps any initializer in an external file."""
    model = read(path, weights=False)
    return any(t.data_location == onnx.TensorProto.EXTERNAL for t in model.graph.initializer)


def external_files(path: str | os.PathLike) -> list[str]:
    """The external-data files a model file refers to."""
    model = read(path, weights=False)
    locations = {entry.value for t in model.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL
                 for entry in t.external_data if entry.key == "location"}
    return [os.path.join(os.path.dirname(os.path.abspath(path)), location) for location in sorted(locations)]


def size_on_disk(path: str | os.PathLike) -> int:
    """A model file's size plus its external data's."""
    return os.path.getsize(path) + sum(os.path.getsize(f) for f in external_files(path) if os.path.isfile(f))


def shell(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of ``model`` without its initializers (every other field copied: nodes, inputs,
    metadata… a few MB at most)."""
    copy = onnx.ModelProto()
    for field, value in model.ListFields():
        if field.name != "graph":
            _copy_field(copy, field, value)
    for field, value in model.graph.ListFields():
        if field.name != "initializer":
            _copy_field(copy.graph, field, value)
    return copy


def _copy_field(target, field, value) -> None:
    if field.is_repeated:
        getattr(target, field.name).extend(value)
    elif field.type == field.TYPE_MESSAGE:
        getattr(target, field.name).CopyFrom(value)
    else:
        setattr(target, field.name, value)


def _tensor_bytes(tensor: onnx.TensorProto) -> bytes:
    """The tensor's data in ``raw_data`` layout (little-endian, as ONNX stores it)."""
    if tensor.HasField("raw_data"):
        return tensor.raw_data
    array = numpy_helper.to_array(tensor)
    return array.astype(array.dtype.newbyteorder("<"), copy=False).tobytes()


def _chunks(model: onnx.ModelProto) -> Iterator[bytes]:
    """The model encoded piece by piece: the initializer-free shell, then each initializer framed as
    a ``ModelProto`` of its own (``graph { initializer { … } }``), one tensor encoded at a time."""
    yield shell(model).SerializeToString()
    for tensor in model.graph.initializer:
        encoded = tensor.SerializeToString()
        initializer = _tag(_GRAPH_INITIALIZER) + _varint(len(encoded))
        yield _tag(_MODEL_GRAPH) + _varint(len(initializer) + len(encoded)) + initializer
        yield encoded


def _tag(field: int) -> bytes:
    """The key of a length-delimited field."""
    return _varint(field << 3 | _LENGTH_DELIMITED)


def _varint(value: int) -> bytes:
    encoded = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        encoded.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(encoded)


def _write_external(model: onnx.ModelProto, model_path: str, data_path: str, location: str) -> None:
    """``data_path``: each initializer of at least ``EXTERNAL_THRESHOLD`` bytes; ``model_path``: the
    model, whose initializers point there (the smaller ones stay inline)."""
    written = shell(model)
    with open(data_path, "wb") as data:
        for tensor in model.graph.initializer:
            stub = written.graph.initializer.add()
            if tensor.data_location == onnx.TensorProto.EXTERNAL:
                raise CompileError(f"initializer '{tensor.name}' has external data that was never read; "
                                   "load the model with its external data before saving it")
            if tensor.data_type == onnx.TensorProto.STRING or _nbytes(tensor) < EXTERNAL_THRESHOLD:
                stub.CopyFrom(tensor)
                continue
            payload = _tensor_bytes(tensor)
            offset = data.tell()
            if len(payload) >= _ALIGN_THRESHOLD and offset % _ALIGNMENT:
                offset += _ALIGNMENT - offset % _ALIGNMENT
                data.seek(offset)
            data.write(payload)
            stub.name, stub.data_type = tensor.name, tensor.data_type
            if tensor.doc_string:
                stub.doc_string = tensor.doc_string
            stub.dims.extend(tensor.dims)
            stub.data_location = onnx.TensorProto.EXTERNAL
            for key, value in (("location", location), ("offset", str(offset)), ("length", str(len(payload)))):
                entry = stub.external_data.add()
                entry.key, entry.value = key, value
    with open(model_path, "wb") as file:
        file.write(written.SerializeToString())


def _nbytes(tensor: onnx.TensorProto) -> int:
    """The tensor's encoded size, about: from its dims where its data is raw bytes (reading
    ``raw_data`` or ``ByteSize()`` would copy or encode them)."""
    if tensor.HasField("raw_data") and tensor.data_type != onnx.TensorProto.STRING:
        itemsize = onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type).itemsize
        return int(np.prod(tensor.dims, dtype=np.int64)) * itemsize
    return tensor.ByteSize()


def encoded_size(model: onnx.ModelProto) -> int:
    """About the bytes of ``model`` serialised: its shell's plus its initializers'. ``model.ByteSize()``
    would encode the whole model to count them (protobuf's upb backend caches no sizes): a
    second copy of the weights for five seconds on a ViT-L."""
    return shell(model).ByteSize() + sum(_nbytes(t) + 16 for t in model.graph.initializer)


def save(model: onnx.ModelProto, path: str | os.PathLike, external_data: bool = False) -> None:
    """Write ``model`` to ``path`` (and ``path.data`` with ``external_data`` or when the model is over
    protobuf's limit) all at once: no half-written file on failure. ``model`` is not changed.

    The weights file gets the model file's permissions (those of a new file under the umask).
    """
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    external_data = external_data or encoded_size(model) > PROTOBUF_LIMIT
    data_name = os.path.basename(path) + ".data"
    staging = None
    try:
        os.makedirs(directory, exist_ok=True)
        staging = tempfile.mkdtemp(prefix=".agf-onnx-", dir=directory)
        staged = os.path.join(staging, os.path.basename(path))
        if external_data:
            staged_data = os.path.join(staging, data_name)
            _write_external(model, staged, staged_data, data_name)
            if os.path.getsize(staged_data):  # no file when every tensor is small enough to stay inline
                os.chmod(staged_data, stat.S_IMODE(os.stat(staged).st_mode))
                os.replace(staged_data, os.path.join(directory, data_name))
        else:
            with open(staged, "wb") as file:
                for chunk in _chunks(model):
                    file.write(chunk)
        os.replace(staged, path)
    except OSError as error:
        staged_file = staging is not None and str(error.filename or "").startswith(staging)
        where = error.filename if error.filename and not staged_file else path
        raise CompileError(f"-o {path}: cannot write {where}: {error.strerror or error}") from error
    finally:
        if staging is not None:
            shutil.rmtree(staging, ignore_errors=True)


# -- reading ----------------------------------------------------------------------------------------
#: Extensions ``onnx.load`` reads as text formats (read with it), not binary protobuf.
TEXT_FORMATS = {".txtpb", ".textproto", ".onnxtxt", ".json"}
#: Field numbers of the wire format this reader splits on (onnx.proto3).
_MODEL_GRAPH, _GRAPH_INITIALIZER = 7, 5
_LENGTH_DELIMITED = 2
#: Initializers ``read(weights=False)`` still reads: an external tensor's entry, a small constant.
_SMALL = 1 << 16


def read(path: str | os.PathLike, weights: bool = True) -> onnx.ModelProto:
    """The model in the (binary) file at ``path``, its external data read too, holding at most one
    tensor's bytes beside the model: ``onnx.load`` reads the whole file into one ``bytes`` object and
    parses that, twice the weights at its peak. Here the protobuf wire format is split by hand: each
    ``graph.initializer`` is parsed as it is read, everything else (nodes, inputs, metadata) is
    gathered and parsed at the end; protobuf merges the pieces into the same model.

    ``weights=False``: the initializers stored in the file itself over ``_SMALL`` bytes are left
    out, and external data is not read (the metadata, inputs and outputs of a model that ONNX
    Runtime reads from the file itself; which files its external data lie in).
    """
    path = os.fspath(path)
    if os.path.splitext(path)[1].lower() in TEXT_FORMATS:
        return onnx.load(path, load_external_data=weights)
    model = onnx.ModelProto()
    rest, graph_rest = bytearray(), bytearray()
    size = os.path.getsize(path)
    with open(path, "rb") as file:
        while file.tell() < size:
            start = file.tell()
            field, wire = _read_tag(file)
            if field == _MODEL_GRAPH and wire == _LENGTH_DELIMITED:
                end = _read_varint(file) + file.tell()
                while file.tell() < end:
                    inner_start = file.tell()
                    inner, inner_wire = _read_tag(file)
                    if inner == _GRAPH_INITIALIZER and inner_wire == _LENGTH_DELIMITED:
                        length = _read_varint(file)
                        if weights or length <= _SMALL:
                            model.graph.initializer.add().ParseFromString(_read_exactly(file, length))
                        else:
                            file.seek(length, os.SEEK_CUR)
                        continue
                    _skip(file, inner_wire)
                    graph_rest += _span(file, inner_start)
                if file.tell() != end:
                    raise ValueError("a graph field overruns its length")
                continue
            _skip(file, wire)
            rest += _span(file, start)
    model.MergeFromString(bytes(rest))
    model.graph.MergeFromString(bytes(graph_rest))
    if weights:
        from onnx.external_data_helper import load_external_data_for_model

        if any(t.data_location == onnx.TensorProto.EXTERNAL for t in model.graph.initializer):
            load_external_data_for_model(model, os.path.dirname(os.path.abspath(path)))
    return model


def _span(file, start: int) -> bytes:
    """The bytes from ``start`` to the file's current position (the position is kept)."""
    end = file.tell()
    file.seek(start)
    return _read_exactly(file, end - start)


def _read_exactly(file, count: int) -> bytes:
    data = file.read(count)
    if len(data) != count:
        raise ValueError("the file ends inside a field")
    return data


def _read_varint(file) -> int:
    value, shift = 0, 0
    while True:
        byte = file.read(1)
        if not byte:
            raise ValueError("the file ends inside a varint")
        value |= (byte[0] & 0x7F) << shift
        if byte[0] < 0x80:
            return value
        shift += 7
        if shift > 63:
            raise ValueError("a varint longer than 10 bytes")


def _read_tag(file) -> tuple[int, int]:
    tag = _read_varint(file)
    if tag >> 3 == 0:
        raise ValueError("field number 0")
    return tag >> 3, tag & 7


def _skip(file, wire: int) -> None:
    """Move past the value of a field of wire type ``wire`` (the tag read already)."""
    if wire == 0:
        _read_varint(file)
    elif wire == 1:
        file.seek(8, os.SEEK_CUR)
    elif wire == _LENGTH_DELIMITED:
        length = _read_varint(file)
        file.seek(length, os.SEEK_CUR)
    elif wire == 5:
        file.seek(4, os.SEEK_CUR)
    else:  # groups (3, 4) are not in onnx.proto
        raise ValueError(f"wire type {wire}")


def check_model_file(path: str | os.PathLike) -> None:
    """Refuse a path that cannot hold a model before anything is compiled: a folder, an empty file."""
    if os.path.isdir(path):
        raise CompileError(f"{path}: is a folder, not an ONNX model file")
    if os.path.isfile(path) and os.path.getsize(path) == 0:
        raise CompileError(f"{path}: empty file, not an ONNX model")


def check_writable(path: str | os.PathLike, folder: bool = False) -> None:
    """Refuse an output path that cannot be written before any work is done (nothing is created).

    The nearest existing ancestor must be a folder we may write to (``folder``: ``path`` itself
    may be an existing folder); a file in the way or a missing permission names the path.
    """
    path = os.path.abspath(path)
    if folder and os.path.isdir(path):
        existing = path
    elif folder and os.path.lexists(path):
        raise CompileError(f"-o {path}: is a file; give the folder to write into")
    else:
        if os.path.isdir(path):
            raise CompileError(f"-o {path}: is a folder; give the file to write")
        existing = os.path.dirname(path)
        while not os.path.lexists(existing):
            existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise CompileError(f"-o {path}: cannot write there: {existing} is a file, not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise CompileError(f"-o {path}: cannot write there: no write permission in {existing}")
