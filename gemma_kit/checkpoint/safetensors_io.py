"""Hugging Face model folders: lazy safetensors reading and streaming safetensors writing.

Reading: `HFFolder` opens `config.json` and the safetensors file(s) (one `model.safetensors`, or
shards listed by `model.safetensors.index.json`), checks every header before any data is read
(all shards present, every tensor in a supported dtype), and acts as a read-only mapping whose
lookups read one tensor from the memory-mapped file. Pickle-based weights (`pytorch_model.bin`,
`.pt`, `.pth`) are refused: unpickling runs arbitrary code.

Writing: the safetensors library serializes a whole dict at once, which would hold a model
twice in memory. `write_safetensors` writes the same format (8-byte header length, JSON header,
then each tensor's bytes in header order) from an iterator, one tensor at a time; the header is
computed in advance from the shapes. Files larger than `max_shard_size` are split into shards
with an index, as transformers' save_pretrained does.
"""

from __future__ import annotations

import importlib.util
import json
import os
import pathlib
import struct
import sys
from collections.abc import Iterable, Iterator, Mapping

import ml_dtypes
import numpy as np

from gemma_kit.checkpoint.staging import write_json
from gemma_kit.errors import CheckpointNotFoundError, ConversionError

CONFIG_FILE = "config.json"
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
# safetensors dtype codes gemma_kit reads and writes (the float formats Gemma is released in).
DTYPES = {
    "F32": np.dtype(np.float32),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "F16": np.dtype(np.float16),
}
_CODES = {dtype: code for code, dtype in DTYPES.items()}
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
DEFAULT_MAX_SHARD_SIZE = 5 * 10**9  # bytes, as the checkpoints on the Hugging Face Hub


def _safe_open(path: pathlib.Path):
    from safetensors import safe_open

    try:
        return safe_open(str(path), framework="numpy")
    except Exception as err:  # SafetensorError, OSError: one message for the user
        raise ConversionError(
            f"cannot read {str(path)!r} as safetensors ({type(err).__name__}: {err}); the file is "
            "incomplete or corrupt: download it again"
        ) from None


def is_hf_folder(path: str | os.PathLike) -> bool:
    """A folder with a config.json and no Orbax checkpoint: a Hugging Face model folder."""
    path = pathlib.Path(path).expanduser()
    return path.is_dir() and (path / CONFIG_FILE).is_file()


class HFFolder(Mapping[str, np.ndarray]):
    """A Hugging Face model folder: `.config` (dict) and tensor name -> array, read on lookup.

    Use as a context manager (or call close()) to release the memory maps.
    """

    def __init__(self, path: str | os.PathLike):
        if importlib.util.find_spec("safetensors") is None:
            raise ImportError(
                "Reading Hugging Face checkpoints needs the safetensors package: "
                "pip install 'gemma-kit[hf]'"
            )
        self.path = pathlib.Path(path).expanduser()
        if not self.path.exists():
            raise CheckpointNotFoundError(f"no Hugging Face model folder at {str(self.path)!r}")
        if not self.path.is_dir() or not (self.path / CONFIG_FILE).is_file():
            raise ConversionError(
                f"{str(self.path)!r} is not a Hugging Face model folder: it has no config.json "
                "(pass the folder that save_pretrained wrote or the Hub snapshot)"
            )
        try:
            self.config = json.loads((self.path / CONFIG_FILE).read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise ConversionError(
                f"{str(self.path / CONFIG_FILE)!r} is not valid JSON: {err}"
            ) from None
        index = self._index()
        files = sorted(set(index.values())) if index else [self._single]
        self._handles: dict[str, object] = {}
        self._files: dict[str, str] = {}
        self._dtypes: dict[str, str] = {}
        self._shapes: dict[str, tuple[int, ...]] = {}
        for file in files:  # headers only: no tensor data is read here
            handle = self._handle(file)
            for name in handle.keys():
                view = handle.get_slice(name)
                self._files[name] = file
                self._dtypes[name] = view.get_dtype()
                self._shapes[name] = tuple(view.get_shape())
        missing = sorted(n for n in index if n not in self._files)
        if missing:
            raise ConversionError(
                f"{len(missing)} tensors listed in {INDEX_FILE} are not in their shard, e.g. "
                f"{missing[:3]}; the download is incomplete: download it again"
            )
        bad = {n: d for n, d in self._dtypes.items() if d not in DTYPES}
        if bad:
            name, dtype = next(iter(sorted(bad.items())))
            raise ConversionError(
                f"{len(bad)} tensors of {str(self.path)!r} are stored as "
                f"{sorted(set(bad.values()))} (e.g. {name!r}: {dtype}); gemma_kit converts "
                "float32, bfloat16 and float16 "
                "checkpoints only. Use the unquantized release of the model."
            )

    def _index(self) -> dict[str, str]:
        """The index's weight map (name -> shard), or {} for a single file; checks the files."""
        index = self.path / INDEX_FILE
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as err:
                raise ConversionError(
                    f"{str(index)!r} is not a safetensors index (no weight_map: {err})"
                ) from None
            absent = sorted({f for f in weight_map.values() if not (self.path / f).is_file()})
            if absent:
                raise ConversionError(
                    f"{str(self.path)!r} lacks {len(absent)} of the shards its {INDEX_FILE} lists "
                    f"({', '.join(absent[:4])}); the download is incomplete: fetch the missing "
                    "files"
                )
            return dict(weight_map)
        found = sorted(p.name for p in self.path.glob("*.safetensors"))
        if SINGLE_FILE in found or len(found) == 1:
            self._single = SINGLE_FILE if SINGLE_FILE in found else found[0]
            return {}
        pickled = sorted(p.name for p in self.path.iterdir() if p.suffix in _PICKLE_SUFFIXES)
        if pickled and not found:
            raise ConversionError(
                f"{str(self.path)!r} holds PyTorch pickle weights ({', '.join(pickled[:3])}) and "
                "no safetensors. gemma_kit never loads pickle files (unpickling can run "
                "arbitrary code); use the model's safetensors release, or convert the folder "
                "in an environment you trust with transformers' save_pretrained"
            )
        raise ConversionError(
            f"no {SINGLE_FILE} or {INDEX_FILE} in {str(self.path)!r}"
            + (
                f" (it has {len(found)} .safetensors files but no index: the download is "
                "incomplete)"
                if found
                else ""
            )
        )

    def _handle(self, file: str):
        if file not in self._handles:
            self._handles[file] = _safe_open(self.path / file)
        return self._handles[file]

    def __getitem__(self, name: str) -> np.ndarray:
        file = self._files[name]  # KeyError for an unknown name, as a Mapping should
        try:
            return self._handle(file).get_tensor(name)
        except Exception as err:
            raise ConversionError(
                f"cannot read tensor {name!r} from {file} ({type(err).__name__}: {err}); the file "
                "is incomplete or corrupt: download it again"
            ) from None

    def __iter__(self) -> Iterator[str]:
        return iter(self._dtypes)

    def __len__(self) -> int:
        return len(self._dtypes)

    def __contains__(self, name: object) -> bool:
        return name in self._dtypes

    def dtype(self, name: str) -> np.dtype:
        return DTYPES[self._dtypes[name]]

    def shape(self, name: str) -> tuple[int, ...]:
        return self._shapes[name]

    def close(self) -> None:
        self._handles.clear()  # safe_open handles unmap when collected

    def __enter__(self) -> HFFolder:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# --------------------------------------------------------------------------------------------
# Writing


def _header(specs: list[tuple[str, tuple[int, ...], np.dtype]]) -> bytes:
    header, offset = {}, 0
    for name, shape, dtype in specs:
        size = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
        header[name] = {
            "dtype": _CODES[np.dtype(dtype)],
            "shape": list(shape),
            "data_offsets": [offset, offset + size],
        }
        offset += size
    # transformers refuses safetensors without a "format" entry in the metadata.
    header["__metadata__"] = {"format": "pt"}
    raw = json.dumps(header, separators=(",", ":")).encode()
    return raw + b" " * (-len(raw) % 8)  # the data starts 8-byte aligned, as the library's


def plan_shards(
    specs: list[tuple[str, tuple[int, ...], np.dtype]], max_shard_size: int
) -> list[list[tuple[str, tuple[int, ...], np.dtype]]]:
    """Consecutive tensors grouped into shards of at most max_shard_size bytes each (a tensor
    larger than that gets a shard of its own)."""
    shards: list[list[tuple[str, tuple[int, ...], np.dtype]]] = []
    current: list[tuple[str, tuple[int, ...], np.dtype]] = []
    size = 0
    for spec in specs:
        nbytes = int(np.prod(spec[1], dtype=np.int64)) * np.dtype(spec[2]).itemsize
        if current and size + nbytes > max_shard_size:
            shards.append(current)
            current, size = [], 0
        current.append(spec)
        size += nbytes
    if current:
        shards.append(current)
    return shards


def write_safetensors(
    folder: pathlib.Path,
    specs: list[tuple[str, tuple[int, ...], np.dtype]],
    tensors: Iterable[tuple[str, np.ndarray]],
    *,
    max_shard_size: int = DEFAULT_MAX_SHARD_SIZE,
    progress=None,
    basename: str = "model",
) -> list[pathlib.Path]:
    """Writes `tensors` (yielded in `specs` order) into `folder` as safetensors shards.

    One shard is `{basename}.safetensors`; several are `{basename}-0000i-of-0000n.safetensors`
    plus `{basename}.safetensors.index.json`. Each tensor is checked against its spec and
    written as soon as it arrives, so memory holds one tensor at a time. `progress` (a tqdm
    bar) is advanced by the bytes written.
    """
    for name, _, dtype in specs:
        if np.dtype(dtype) not in _CODES:
            raise ConversionError(
                f"cannot write {name!r} as {dtype}: use float32, bfloat16 or float16"
            )
    shards = plan_shards(specs, max_shard_size)
    names = (
        [f"{basename}.safetensors"]
        if len(shards) == 1
        else [
            f"{basename}-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))
        ]
    )
    stream = iter(tensors)
    written = []
    for shard, filename in zip(shards, names):
        path = folder / filename
        header = _header(shard)
        with open(path, "wb") as f:
            f.write(struct.pack("<Q", len(header)))
            f.write(header)
            for name, shape, dtype in shard:
                got_name, tensor = next(stream)
                if (
                    got_name != name
                    or tuple(tensor.shape) != tuple(shape)
                    or (tensor.dtype != np.dtype(dtype))
                ):
                    raise ConversionError(  # a bug in the caller, never the user's input
                        f"expected tensor {name} {shape} {dtype}, got {got_name} "
                        f"{tuple(tensor.shape)} {tensor.dtype}"
                    )
                data = np.ascontiguousarray(tensor)
                if sys.byteorder == "big":  # safetensors is little-endian
                    data = data.byteswap()
                f.write(data.reshape(-1).view(np.uint8).data)
                if progress is not None:
                    progress.update(data.nbytes)
                del tensor, data
        written.append(path)
    if len(shards) > 1:
        weight_map = {
            name: filename for shard, filename in zip(shards, names) for name, _, _ in shard
        }
        total = sum(int(np.prod(s, dtype=np.int64)) * np.dtype(d).itemsize for _, s, d in specs)
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        write_json(folder / f"{basename}.safetensors.index.json", index)
    return written


def tensor_bytes(specs) -> int:
    return sum(int(np.prod(s, dtype=np.int64)) * np.dtype(d).itemsize for _, s, d in specs)
