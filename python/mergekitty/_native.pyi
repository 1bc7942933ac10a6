"""Native core of mergekitty (Rust, rust/src/py): safetensors files over mmaps, the shard writer
and the CPU kernels. Kernels read and write caller-allocated little-endian buffers of the
safetensors dtype codes they are given ("F32", "F16", "BF16"); ``threads=0`` uses every core.

Errors are raised as ``mergekitty.errors`` classes: FileIOError (an OSError), SafetensorsError,
ModelFormatError (an input changed while mapped), TensorNotFoundError (a KeyError),
InvalidArgumentError and ShardWriterError (ValueErrors).

A read of a mapped input that shrank under it does not kill the process: the native module
installs a SIGBUS handler that fills such pages with zeros and remembers it, and
``SafetensorsFile.check_intact`` reports it.
"""

from collections.abc import Sequence
from os import PathLike
from types import TracebackType
from typing import Literal, Self, final

from typing_extensions import Buffer

from mergekitty.errors import SafetensorsError as SafetensorsError

__all__ = [
    "__version__",
    "SafetensorsError",
    "SafetensorsFile",
    "TensorView",
    "ShardWriter",
    "plan_layout",
    "shard_digest",
    "weighted_sum",
    "convert",
    "TensorHealth",
    "scan_health",
    "magnitude",
    "magnitude_outliers",
    "random_mask",
    "della",
    "combine",
    "uniform",
    "Sparsity",
    "gta_merge",
    "nearswap_merge",
    "sce_merge",
    "arcee_fusion_merge",
]

__version__: str

@final
class SafetensorsFile:
    """An open, memory-mapped safetensors file with a validated header."""

    def __new__(cls, path: str | PathLike[str]) -> Self: ...
    @property
    def path(self) -> str: ...
    @property
    def nbytes(self) -> int: ...
    def metadata(self) -> dict[str, str] | None:
        """The ``__metadata__`` entry, or None."""

    def tensors(self) -> list[tuple[str, str, list[int], int, int]]:
        """(name, dtype code, shape, start, end) with absolute byte offsets, sorted by start."""

    def view(self, name: str) -> TensorView:
        """A read-only, zero-copy buffer over the tensor's bytes."""

    def prefetch(self, name: str) -> None: ...
    def release(self, name: str) -> None: ...
    def check_intact(self) -> None:
        """Raise ModelFormatError naming the file if it changed since it was opened: a read ran
        past its end (it shrank while mapped), or its size, inode or mtime differ."""

    def __contains__(self, key: str, /) -> bool: ...
    def __len__(self) -> int: ...

# Buffer as a base: the buffer protocol is a C slot, with no __buffer__ method to declare on 3.11.
@final
class TensorView(Buffer):
    """Read-only bytes of one tensor (a 1-D "B" buffer); keeps the mapping alive."""

    def __len__(self) -> int: ...

def plan_layout(
    tensors: Sequence[tuple[str, str, Sequence[int]]],
    max_shard_bytes: int,
    metadata: dict[str, str] | None = None,
) -> list[tuple[str, str, int, int]]: ...
def shard_digest(path: str | PathLike[str]) -> str:
    """The digest a ShardWriter journals for a complete shard, recomputed from the file."""

@final
class ShardWriter:
    """Writes the planned tensors into safetensors shards (and an index when there are several)."""

    def __new__(
        cls,
        out_dir: str | PathLike[str],
        tensors: Sequence[tuple[str, str, Sequence[int]]],
        max_shard_bytes: int,
        metadata: dict[str, str] | None = None,
        index_metadata: dict[str, str] | None = None,
        reuse: Sequence[str] | None = None,
        journal: str | PathLike[str] | None = None,
    ) -> Self: ...
    def is_written(self, name: str) -> bool: ...
    @property
    def shard_files(self) -> list[str]: ...
    @property
    def total_bytes(self) -> int: ...
    def shard_of(self, name: str) -> str: ...
    def write(self, name: str, data: Buffer) -> None: ...
    def finalize(self) -> list[str]:
        """Sync and publish every shard and the index; returns the file names written."""

    def abort(self) -> None: ...
    def __enter__(self) -> Self: ...
    def __exit__(
        self,
        exc_type: type[BaseException] | None = None,
        _exc: BaseException | None = None,
        _tb: TracebackType | None = None,
    ) -> bool: ...

@final
class Sparsity:
    """One model's sparsifier in ``gta_merge`` ("l1" rescale raises: only the torch reference has it)."""

    def __new__(
        cls,
        kind: Literal["none", "magnitude", "outliers", "random", "della"],
        density: float = 1.0,
        gamma: float = 0.0,
        epsilon: float = 0.0,
        key: str = "",
        rescale: Literal["none", "inverse", "l1"] = "none",
    ) -> Self: ...
    @property
    def kind(self) -> Literal["none", "magnitude", "outliers", "random", "della"]: ...
    @property
    def density(self) -> float: ...
    @property
    def gamma(self) -> float: ...
    @property
    def epsilon(self) -> float: ...
    @property
    def key(self) -> str: ...
    @property
    def rescale(self) -> Literal["none", "inverse"]: ...

@final
class TensorHealth:
    """What a kernel call saw: per input (in the order the call takes them) and for its output as
    written, the count of NaN/Inf elements and the sum of squares of the finite ones (float64).
    The output's sum of squares may be taken on the unrounded float32 results (within 2**-8)."""

    @property
    def input_nonfinite(self) -> list[int]: ...
    @property
    def input_sumsq(self) -> list[float]: ...
    @property
    def output_nonfinite(self) -> int: ...
    @property
    def output_sumsq(self) -> float: ...

def scan_health(data: Buffer, dtype: str, threads: int = 0) -> TensorHealth:
    """The figures of one F32/F16/BF16 tensor (a copied tensor): its one input and its output."""

def weighted_sum(
    inputs: Sequence[Buffer],
    in_dtypes: Sequence[str],
    weights: Sequence[float],
    out: Buffer,
    out_dtype: str,
    threads: int = 0,
) -> TensorHealth:
    """out = sum_i weights[i] * inputs[i], accumulated in float32, written as ``out_dtype``.
    Returns the inputs' and the output's health."""

def convert(input: Buffer, in_dtype: str, out: Buffer, out_dtype: str, threads: int = 0) -> None:
    """Cast ``input`` into ``out`` among F32/F16/BF16."""

def magnitude(x: Buffer, density: float, rescale_l1: bool = False, threads: int = 0) -> None:
    """TIES top-k by magnitude, in place on a float32 buffer."""

def magnitude_outliers(x: Buffer, density: float, gamma: float, rescale_l1: bool = False, threads: int = 0) -> None:
    """Breadcrumbs, in place on a float32 buffer."""

def random_mask(
    x: Buffer,
    density: float,
    seed: int,
    key: str,
    rescale: Literal["inverse", "l1", "none"] = "inverse",
    threads: int = 0,
) -> None:
    """DARE, in place on a float32 buffer."""

def della(
    x: Buffer,
    rows: int,
    row_len: int,
    density: float,
    epsilon: float,
    seed: int,
    key: str,
    rescale: Literal["inverse", "l1", "none"] = "inverse",
    threads: int = 0,
) -> None:
    """DELLA on ``rows`` rows of ``row_len`` elements, in place on a float32 buffer."""

def combine(
    deltas: Sequence[Buffer],
    weights: Sequence[float],
    consensus: bool,
    normalize: bool,
    lambda_: float,
    base: Buffer | None,
    base_dtype: str,
    out: Buffer,
    out_dtype: str,
    threads: int = 0,
) -> None:
    """out = base + lambda_ * M (or lambda_ * M without a base), M the (sign-consensus) weighted
    combination of the float32 task vectors ``deltas``."""

def uniform(seed: int, key: str, start: int, out: Buffer) -> None:
    """Fill the float32 buffer ``out`` with ``uniform(seed, key, start + j)``."""

def gta_merge(
    xs: Sequence[Buffer],
    x_dtypes: Sequence[str],
    base: Buffer,
    base_dtype: str,
    out: Buffer,
    out_dtype: str,
    shape: Sequence[int],
    sparsity: Sequence[Sparsity],
    weights: Sequence[float],
    consensus: bool,
    normalize: bool,
    lambda_: float,
    seed: int,
    threads: int = 0,
) -> TensorHealth:
    """out = base + lambda_ * combine(sparsify_i(x_i - base), weights) for one tensor of ``shape``.
    Returns the health of ``xs``, then ``base``, and of the output."""

def nearswap_merge(
    base: Buffer,
    base_dtype: str,
    other: Buffer,
    other_dtype: str,
    t: float,
    out: Buffer,
    out_dtype: str,
    threads: int = 0,
) -> TensorHealth:
    """NearSwap (methods/nearswap.py, bit-identical). Returns the health of ``base``, ``other``
    and the output."""

def sce_merge(
    base: Buffer,
    base_dtype: str,
    inputs: Sequence[Buffer],
    in_dtypes: Sequence[str],
    select_topk: float,
    out: Buffer,
    out_dtype: str,
    threads: int = 0,
) -> TensorHealth:
    """SCE of ``base`` and the models ``inputs`` in config order (methods/sce.py). Returns the
    health of ``base``, then ``inputs``, and of the output."""

def arcee_fusion_merge(
    base: Buffer,
    base_dtype: str,
    other: Buffer,
    other_dtype: str,
    row_len: int,
    out: Buffer,
    out_dtype: str,
    threads: int = 0,
) -> TensorHealth:
    """Arcee Fusion (methods/arcee_fusion.py), softmax and KL along rows of ``row_len`` elements
    (the last axis; a 1-D tensor is one row). Returns the health of ``base``, ``other`` and the
    output."""
