"""One input model on disk: its tensor index, and zero-copy access to each tensor.

safetensors files are opened through the native module (mmap, validated
headers); ``pytorch_model*.bin`` files through ``torch.load(weights_only=True,
mmap=True)``, which never unpickles arbitrary objects.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import ModelFormatError, ModelNotFoundError
from ..text import dtype_text
from .dtypes import code_of, torch_dtype
from .model_files import confined, model_file, read_json

__all__ = ["Checkpoint", "TensorInfo", "confined"]

if TYPE_CHECKING:
    import torch

SAFETENSORS_INDEX = "model.safetensors.index.json"
SAFETENSORS_SINGLE = "model.safetensors"
BIN_INDEX = "pytorch_model.bin.index.json"
BIN_SINGLE = "pytorch_model.bin"
# files read with torch.load (weights only): pickled state dicts, as torch.save writes them
TORCH_SUFFIXES = (".bin", ".pt", ".pth")


@dataclass(frozen=True)
class TensorInfo:
    name: str
    dtype: str  # safetensors code, e.g. "BF16"
    shape: tuple[int, ...]
    file: str  # file name inside the model directory
    start: int  # byte offset in the file (0 for .bin)
    nbytes: int


class _SafetensorsShard:
    def __init__(self, path: Path):
        from .. import _native

        try:
            self.handle = _native.SafetensorsFile(str(path))
        except _native.SafetensorsError as exc:
            raise ModelFormatError(str(exc)) from None
        except OSError as exc:
            raise ModelFormatError(f"{path}: cannot open: {exc.strerror or exc}") from None

    def infos(self, file_name: str) -> list[TensorInfo]:
        return [
            TensorInfo(name, dtype, tuple(shape), file_name, start, end - start)
            for name, dtype, shape, start, end in self.handle.tensors()
        ]

    def view(self, info: TensorInfo):
        return self.handle.view(info.name)

    def tensor(self, info: TensorInfo) -> torch.Tensor:
        import torch

        view = self.handle.view(info.name)
        dtype = torch_dtype(info.dtype)
        if dtype is None:
            raise ModelFormatError(
                f"{self.handle.path}: tensor '{info.name}' has dtype {dtype_text(info.dtype)}, which torch cannot hold"
            )
        if info.nbytes == 0:
            return torch.empty(info.shape, dtype=dtype)
        with warnings.catch_warnings():
            # the mapping is read-only; tensors handed to methods are never written to
            warnings.simplefilter("ignore", UserWarning)
            flat = torch.frombuffer(view, dtype=dtype)
        return flat.view(info.shape)

    def prefetch(self, name: str) -> None:
        self.handle.prefetch(name)

    def release(self, name: str) -> None:
        self.handle.release(name)

    def check_intact(self) -> None:
        self.handle.check_intact()


class _BinShard:
    def __init__(self, path: Path):
        from ..extras import require_torch

        torch = require_torch(f"reading .bin checkpoints ({path})")

        try:
            try:
                state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError:  # legacy (non-zip) pickles cannot be mmapped
                state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # pickle errors come in many types
            raise ModelFormatError(f"{path}: cannot read as a weights-only torch checkpoint: {exc}") from None
        if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
            state = state["state_dict"]
        if not isinstance(state, dict):
            raise ModelFormatError(f"{path}: expected a dict of tensors, found {type(state).__name__}")
        self.tensors = {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}
        self.path = path

    def infos(self, file_name: str) -> list[TensorInfo]:
        out = []
        for name, t in self.tensors.items():
            code = code_of(t.dtype)
            if code is None:
                raise ModelFormatError(f"{self.path}: tensor '{name}' has unsupported dtype {dtype_text(t.dtype)}")
            out.append(TensorInfo(name, code, tuple(t.shape), file_name, 0, t.numel() * t.element_size()))
        return out

    def view(self, info: TensorInfo):
        return None  # pickled tensors are read through torch

    def tensor(self, info: TensorInfo) -> torch.Tensor:
        return self.tensors[info.name].contiguous()

    def prefetch(self, name: str) -> None:
        pass

    def release(self, name: str) -> None:
        pass

    def check_intact(self) -> None:
        pass  # torch maps these files itself; only the native reader can watch a map


def _read_index(path: Path) -> dict[str, str]:
    data = read_json(path)
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise ModelFormatError(
            f"{path}: not a valid checkpoint index ('weight_map' must map tensor names to file names)"
        )
    return weight_map


class Checkpoint:
    """The tensors of one model directory, opened lazily and read zero-copy."""

    def __init__(self, directory: Path, label: str | None = None, files: list[str] | None = None):
        """``files``: read exactly these files of ``directory`` (e.g. a LoRA adapter's
        ``adapter_model.safetensors``) instead of discovering the model's weights."""
        self.directory = Path(directory)
        self.label = label or str(directory)
        if not self.directory.is_dir():
            raise ModelNotFoundError(f"model directory not found: {self.directory}")
        self._index_map = None
        self.files = list(files) if files is not None else self._discover()
        self._shards: dict[str, _SafetensorsShard | _BinShard] = {}
        self.infos: dict[str, TensorInfo] = {}
        for file_name in self.files:
            for info in self._shard(file_name).infos(file_name):
                if info.name in self.infos:
                    raise ModelFormatError(
                        f"{self.directory}: tensor '{info.name}' appears in both {self.infos[info.name].file} and {file_name}"
                    )
                self.infos[info.name] = info
        self._check_index()

    def _discover(self) -> list[str]:
        d = self.directory
        self._index_map: dict[str, str] | None = None
        for index_name in (SAFETENSORS_INDEX, BIN_INDEX):
            index = model_file(d, index_name)
            if index is not None:
                self._index_map = _read_index(index)
                files = list(dict.fromkeys(self._index_map.values()))
                for f in files:
                    if not confined(d, f, str(d / index_name)).is_file():
                        raise ModelFormatError(f"{d / index_name}: lists shard '{f}', which does not exist")
                return files
        for single in (SAFETENSORS_SINGLE, BIN_SINGLE):
            if (d / single).is_file():
                return [single]
        loose = sorted(p.name for p in d.glob("*.safetensors") if not p.name.startswith("adapter_"))
        if loose:
            return loose
        raise ModelNotFoundError(
            f"{d}: no model weights found (expected {SAFETENSORS_SINGLE}, {SAFETENSORS_INDEX}, {BIN_SINGLE} or {BIN_INDEX})"
        )

    def _check_index(self) -> None:
        if self._index_map is None:
            return
        for name, file_name in self._index_map.items():
            info = self.infos.get(name)
            if info is None or info.file != file_name:
                raise ModelFormatError(
                    f"{self.directory}: the index puts tensor '{name}' in {file_name}, but it is not there"
                )

    def _shard(self, file_name: str):
        shard = self._shards.get(file_name)
        if shard is None:
            path = confined(self.directory, file_name, str(self.directory))
            shard = _BinShard(path) if file_name.endswith(TORCH_SUFFIXES) else _SafetensorsShard(path)
            self._shards[file_name] = shard
        return shard

    def __contains__(self, name: str) -> bool:
        return name in self.infos

    def names(self) -> list[str]:
        return list(self.infos)

    def tensor(self, name: str) -> torch.Tensor:
        info = self.infos[name]
        return self._shard(info.file).tensor(info)

    def mapped(self, name: str) -> bool:
        """Whether ``view`` gives the tensor's bytes (a safetensors file; a torch pickle needs torch)."""
        return not self.infos[name].file.endswith(TORCH_SUFFIXES)

    def view(self, name: str):
        """A zero-copy read-only byte buffer of the tensor, or None where only torch can read it."""
        info = self.infos[name]
        return self._shard(info.file).view(info)

    def prefetch(self, name: str) -> None:
        info = self.infos[name]
        self._shard(info.file).prefetch(name)

    def release(self, name: str) -> None:
        """Done with ``name``: drop its pages from this process (they stay in the page cache),
        and check that what was read was the file's (``check_intact``), so that every reader
        that releases what it read stops at an input that changed under it."""
        shard = self._shard(self.infos[name].file)
        shard.release(name)
        shard.check_intact()

    def check_intact(self, names: Iterable[str] | None = None) -> None:
        """Raise ModelFormatError naming the file if a file holding ``names`` (every opened
        file when None) changed since it was opened: it shrank under a read, or was replaced
        or rewritten. Whatever was computed from it since is not to be trusted."""
        files = self._shards if names is None else dict.fromkeys(self.infos[n].file for n in names)
        for file_name in files:
            shard = self._shards.get(file_name)
            if shard is not None:
                shard.check_intact()

    def config(self) -> dict[str, Any]:
        """The model's ``config.json``, with every value mergekitty reads checked."""
        from ..architecture.config_json import check_model_config

        path = model_file(self.directory, "config.json")
        if path is None:
            raise ModelFormatError(f"{self.directory}: no config.json")
        cfg = read_json(path)
        check_model_config(cfg, path)
        return cfg
