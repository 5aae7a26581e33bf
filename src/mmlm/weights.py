"""Weights on disk, read lazily, and the low-memory load of a model built on the meta device.

`mmlm.load(path, dtype=, device=)` builds the model under `torch.device("meta")` (shapes only, no memory),
opens the .safetensors files as memory maps and copies each tensor straight into a tensor of its final dtype
and device, which then becomes the model's parameter. A fused mmlm tensor (q/k/v, gate/up) is one such
tensor, its parts copied into its rows in place. The file pages of a tensor are given back to the OS once it
is copied, so while loading the process holds the model in its final dtype plus about one tensor of the file:
no second copy of the state dict, no float32 detour for a bfloat16 model.

The pieces:
    SafetensorsFile   one memory-mapped .safetensors file (header parsed here: 8 bytes of length, JSON, data)
    FileTensor        one tensor of a file, not read yet; `.t()` marks it transposed (OpenAI's projections)
    RowStack          several of them stacked along dim 0 (`mapping.rename` makes one for a fused tensor)
    open_weights      a file or a sharded directory (model.safetensors.index.json) -> {name: FileTensor}
    load_into         the model on the meta device + {name: lazy or real tensor} -> the loaded model
"""

from __future__ import annotations

import json
import mmap
import struct
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Iterable, Mapping

import torch
from torch import nn

# safetensors' dtype names
DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}
# what `dtype=` accepts besides a torch.dtype (the CLI's --dtype)
DTYPE_NAMES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
               "float16": torch.float16, "fp16": torch.float16, "half": torch.float16}
INDEX_NAME = "model.safetensors.index.json"


def parse_dtype(dtype: torch.dtype | str | None) -> torch.dtype:
    """torch.float32 / bfloat16 / float16, or one of their names ("bf16", "float16", ...); None = float32."""
    if dtype is None:
        return torch.float32
    if isinstance(dtype, str):
        if dtype.lower() not in DTYPE_NAMES:
            raise ValueError(f"dtype {dtype!r} is not supported; known: {sorted(DTYPE_NAMES)}")
        dtype = DTYPE_NAMES[dtype.lower()]
    if dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"dtype {dtype} is not supported: a model loads as torch.float32, bfloat16 or float16")
    return dtype


def parse_device(device: torch.device | str | None) -> torch.device:
    """A torch.device; None = cpu, "auto" = cuda when available, else cpu (devices.resolve: one rule everywhere)."""
    from .devices import resolve

    return resolve(device, "device")


# ----------------------------------------------------------------------------- files

class SafetensorsFile:
    """A .safetensors file mapped into memory; `view(name)` is a tensor over the mapping itself (no copy).

    The mapping is private (copy-on-write) only because torch.frombuffer wants a writable buffer; nothing
    writes to it. `release(name)` tells the OS it may drop that tensor's pages: resident file pages count in
    the process's memory, and a whole model's worth of them would double the peak of a load.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        with open(self.path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise ValueError(f"{self.path}: not a safetensors file (shorter than its 8-byte header length)")
            (n,) = struct.unpack("<Q", head)
            size = self.path.stat().st_size
            if 8 + n > size:
                raise ValueError(f"{self.path}: not a safetensors file (header of {n} bytes in a {size}-byte file)")
            try:
                header = json.loads(f.read(n))
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise ValueError(f"{self.path}: not a safetensors file (header is not JSON: {e})") from None
            self._map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
        self.metadata = header.pop("__metadata__", None) or {}
        self.start = 8 + n
        self.entries: dict[str, tuple[torch.dtype, tuple[int, ...], int, int]] = {}  # name -> dtype, shape, begin, end
        for name, e in header.items():
            if e.get("dtype") not in DTYPES:
                raise ValueError(f"{self.path}: tensor {name!r} has dtype {e.get('dtype')!r}, not one torch reads")
            dtype, shape, (begin, end) = DTYPES[e["dtype"]], tuple(e["shape"]), e["data_offsets"]
            numel = 1
            for s in shape:
                numel *= s
            if end - begin != numel * dtype.itemsize or not 0 <= begin <= end <= size - self.start:
                raise ValueError(f"{self.path}: tensor {name!r} ({e['dtype']} {list(shape)}) has bad data offsets "
                                 f"{[begin, end]}: the file is damaged or truncated")
            self.entries[name] = (dtype, shape, begin, end)

    def keys(self) -> list[str]:
        return list(self.entries)

    def view(self, name: str) -> torch.Tensor:
        """The tensor's bytes in the mapping, as a tensor (reading it pages the file in)."""
        dtype, shape, begin, end = self.entries[name]
        if begin == end:
            return torch.empty(shape, dtype=dtype)
        flat = torch.frombuffer(self._map, dtype=dtype, count=(end - begin) // dtype.itemsize, offset=self.start + begin)
        return flat.view(shape)

    def release(self, name: str) -> None:
        """Drop the tensor's pages from this process (the OS keeps them cached; a page shared with a neighbour
        is simply read again if needed)."""
        if not hasattr(mmap, "MADV_DONTNEED"):  # not on Windows: there the pages stay until close()
            return
        _, _, begin, end = self.entries[name]
        start = (self.start + begin) // mmap.PAGESIZE * mmap.PAGESIZE
        if end > begin:
            self._map.madvise(mmap.MADV_DONTNEED, start, self.start + end - start)

    def close(self) -> None:
        self._map.close()


@dataclass(frozen=True)
class FileTensor:
    """One tensor of a SafetensorsFile, read only when `read_into` copies it into its destination."""

    file: SafetensorsFile
    name: str
    transposed: bool = False

    @property
    def shape(self) -> torch.Size:
        shape = self.file.entries[self.name][1]
        return torch.Size(shape[::-1] if self.transposed else shape)

    @property
    def dtype(self) -> torch.dtype:
        return self.file.entries[self.name][0]

    def t(self) -> "FileTensor":
        if len(self.shape) != 2:
            raise ValueError(f"{self.file.path}: {self.name} is not a matrix and cannot be transposed")
        return replace(self, transposed=not self.transposed)

    def read_into(self, out: torch.Tensor) -> None:
        """Copy the tensor into `out` (any dtype, any device: the copy converts), then let its pages go."""
        src = self.file.view(self.name)
        out.copy_(src.t() if self.transposed else src)
        del src
        self.file.release(self.name)


@dataclass(frozen=True)
class RowStack:
    """Tensors stacked along dim 0 (torch.cat), not read yet: a fused q/k/v or gate/up weight from its parts."""

    parts: tuple[Any, ...]  # FileTensor, RowStack or torch.Tensor

    @property
    def shape(self) -> torch.Size:
        rest = self.parts[0].shape[1:]
        for p in self.parts:
            if p.shape[1:] != rest:
                raise ValueError(f"cannot stack tensors of shapes {[tuple(p.shape) for p in self.parts]} along dim 0")
        return torch.Size((sum(p.shape[0] for p in self.parts), *rest))

    @property
    def dtype(self) -> torch.dtype:
        return self.parts[0].dtype

    def t(self) -> Any:
        raise ValueError("a stacked (fused) tensor is not transposed by any conversion rule")

    def read_into(self, out: torch.Tensor) -> None:
        """Each part into its own rows of `out`, in place."""
        row = 0
        for p in self.parts:
            read_into(p, out[row : row + p.shape[0]])
            row += p.shape[0]


def is_lazy(t: Any) -> bool:
    return isinstance(t, (FileTensor, RowStack))


def read_into(t: Any, out: torch.Tensor) -> None:
    """Copy a lazy or a real tensor into `out`."""
    if is_lazy(t):
        t.read_into(out)
    else:
        out.copy_(t)


def open_weights(path: str | Path) -> tuple[dict[str, FileTensor], list[SafetensorsFile]]:
    """Every tensor of a .safetensors file, or of a directory's sharded model.safetensors.index.json, unread.

    Returns ({name: FileTensor}, the open files: close them when done)."""
    path = Path(path)
    if path.is_dir():
        index = path / INDEX_NAME
        if not index.is_file():
            raise FileNotFoundError(f"{path}: no {INDEX_NAME}")
        weight_map = json.loads(index.read_text()).get("weight_map") or {}
        files = [SafetensorsFile(path / shard) for shard in sorted(set(weight_map.values()))]
    else:
        weight_map, files = None, [SafetensorsFile(path)]
    tensors: dict[str, FileTensor] = {}
    for f in files:
        for name in f.keys():
            if name in tensors:
                raise ValueError(f"{path}: tensor {name!r} is in both {tensors[name].file.path.name} and {f.path.name}")
            tensors[name] = FileTensor(f, name)
    if weight_map is not None:
        absent = sorted(set(weight_map) - set(tensors))
        if absent:
            raise ValueError(f"{path / INDEX_NAME}: tensor(s) {absent[:8]} listed but in no shard")
    return tensors, files


def close_all(files: Iterable[SafetensorsFile]) -> None:
    for f in files:
        f.close()


# ----------------------------------------------------------------------------- strict names and shapes

def check_state_dict(expected: Mapping[str, Any], got: Mapping[str, Any], source: str) -> None:
    """A ValueError naming every missing, unexpected or mis-shaped tensor (values: anything with .shape)."""
    missing = sorted(set(expected) - set(got))
    unexpected = sorted(set(got) - set(expected))
    mis_shaped = [f"{k}: file {tuple(got[k].shape)} vs model {tuple(expected[k].shape)}"
                  for k in expected if k in got and tuple(got[k].shape) != tuple(expected[k].shape)]
    problems = []
    if missing:
        problems.append(f"missing tensor(s) {missing[:8]}" + (" ..." if len(missing) > 8 else ""))
    if unexpected:
        problems.append(f"unexpected tensor(s) {unexpected[:8]}" + (" ..." if len(unexpected) > 8 else ""))
    if mis_shaped:
        problems.append(f"mis-shaped tensor(s) {mis_shaped[:8]}")
    if problems:
        raise ValueError(f"{source}: " + "; ".join(problems))


# ----------------------------------------------------------------------------- the load

def load_into(model: nn.Module, sd: Mapping[str, Any], source: str, dtype: torch.dtype = torch.float32,
              device: torch.device | str = "cpu") -> nn.Module:
    """Give `model` (built on the meta device) the weights `sd` ({name: FileTensor | RowStack | Tensor}),
    strictly: every tensor is allocated once in its final place (floating point ones in `dtype`, others as the
    model declares them) and filled from its source, then replaces the meta one. Parameters the model shares
    (tied embeddings) stay one parameter. Non-persistent buffers (RoPE frequencies) follow from the config and
    were built as real tensors: they move to `device` and keep their dtype (transformers keeps them float32).
    """
    device = torch.device(device)
    expected = model.state_dict(keep_vars=True)
    check_state_dict(expected, sd, source)
    new: dict[int, torch.Tensor] = {}  # id(meta tensor) -> its loaded tensor, so tied parameters stay tied
    for name, old in expected.items():
        if id(old) in new:
            continue
        t = torch.empty(old.shape, dtype=dtype if old.is_floating_point() else old.dtype, device=device)
        if device.type != "meta":  # device="meta": the architecture only, nothing read
            read_into(sd[name], t)
        new[id(old)] = t
    for mod_name, mod in model.named_modules():
        for name, p in list(mod.named_parameters(recurse=False)):
            if id(p) in new:
                if not isinstance(new[id(p)], nn.Parameter):
                    new[id(p)] = nn.Parameter(new[id(p)], requires_grad=p.requires_grad)
                setattr(mod, name, new[id(p)])
        for name, b in list(mod.named_buffers(recurse=False)):
            if id(b) in new:
                setattr(mod, name, new[id(b)])
            elif b.is_meta:
                raise ValueError(f"{source}: buffer {mod_name + '.' if mod_name else ''}{name} is not saved and was "
                                 "built on the meta device; a model must compute such buffers on the CPU")
            else:
                setattr(mod, name, b.to(device))
    return model


def place(model: nn.Module, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu") -> nn.Module:
    """A loaded model in `dtype` on `device` the way `load_into` leaves one: parameters and saved buffers in
    `dtype` (floating point ones), non-persistent buffers (RoPE frequencies) only moved."""
    saved = {id(t) for t in model.state_dict(keep_vars=True).values()}
    for mod in model.modules():
        for name, p in list(mod.named_parameters(recurse=False)):
            p.data = p.data.to(device=device, dtype=dtype if p.is_floating_point() else p.dtype)
        for name, b in list(mod.named_buffers(recurse=False)):
            keep = not b.is_floating_point() or id(b) not in saved
            setattr(mod, name, b.to(device=device, dtype=b.dtype if keep else dtype))
    return model
