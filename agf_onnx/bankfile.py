"""A self-supervised model's bank on disk: the ``.npy`` file ``agf-onnx bank`` writes and
``compile --ssl-bank`` reads (float32 ``[rows, features]``)."""

from __future__ import annotations

import os
import tempfile

import numpy as np

from .errors import CompileError

BankLike = np.ndarray | str | os.PathLike


def load_bank(bank: BankLike, argument: str = "--ssl-bank") -> np.ndarray:
    """A bank ``[R, D]`` as float32 from an array or a ``.npy`` file; refuses empty, non-float,
    non-finite or wrongly shaped banks with a message naming ``argument`` or the file."""
    where = f"{argument} {os.fspath(bank)}" if isinstance(bank, (str, os.PathLike)) else argument
    if isinstance(bank, (str, os.PathLike)):
        if not os.path.isfile(bank):
            raise CompileError(f"{where}: no such file")
        try:
            with open(bank, "rb") as stream:
                is_npy = stream.read(6) == b"\x93NUMPY"  # the .npy magic string
            if not is_npy:  # NumPy would try a pickle and say so: not a useful message
                raise CompileError(f"{where}: not a NumPy .npy file (`agf-onnx bank` writes one)")
            bank = np.load(bank, allow_pickle=False)
        except OSError as error:
            raise CompileError(f"{where}: cannot read it ({error.strerror or error})") from error
        except ValueError as error:  # an object array, or a truncated file
            raise CompileError(f"{where}: not a bank of float vectors ({str(error).splitlines()[0]})") from error
    array = np.asarray(bank)
    if not np.issubdtype(array.dtype, np.floating):
        raise CompileError(f"{where}: the bank holds {array.dtype} values; expected floats (the feature vectors "
                           "`agf-onnx bank` writes)")
    if array.ndim != 2:
        raise CompileError(f"{where}: expected a 2-D bank [rows, features], got shape {list(array.shape)}")
    if array.shape[0] == 0 or array.shape[1] == 0:
        raise CompileError(f"{where}: the bank is empty (shape {list(array.shape)}); it needs at least one row")
    if not np.isfinite(array).all():
        raise CompileError(f"{where}: the bank holds NaN or Inf values")
    return np.ascontiguousarray(array, dtype=np.float32)


def save_bank(array: np.ndarray, path: str | os.PathLike) -> None:
    """Write ``array`` to ``path`` as ``.npy`` through a temporary file beside it."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    handle, staged = tempfile.mkstemp(prefix=".agf-onnx-bank-", suffix=".npy", dir=directory)
    try:
        with os.fdopen(handle, "wb") as stream:
            np.save(stream, array)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(staged, 0o666 & ~umask)  # as an ordinary file, not mkstemp's private 0600
        os.replace(staged, path)
    finally:
        if os.path.exists(staged):
            os.remove(staged)
