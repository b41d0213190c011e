"""Checkpoints: safetensors files whose metadata carries the model config as JSON.

- Loaded from any fsspec URI: a local path, s3://, memory://, https://, ...
- The sha256 of the file's bytes is the model version written into every manifest row.
- Keys and shapes are checked strictly against the config's network before anything is loaded.
- Nothing is ever unpickled: only the safetensors format is read.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import fsspec
import safetensors.torch
import torch

from model.config import DenseIsoViTConfig
from model.network import DenseIsoViT

CONFIG_KEY = "isosr.config"
# The shipped default weights (float16; recipe, data and scores in RESULTS.md), used without --checkpoint.
DEFAULT_CHECKPOINT = Path(__file__).parent / "weights" / "default.safetensors"
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")  # DDP and torch.compile wrappers


class CheckpointError(ValueError):
    """A checkpoint that cannot be used; the message names the file and the problem."""

    def __init__(self, uri: str, problem: str) -> None:
        super().__init__(f"checkpoint {uri}: {problem}")
        self.uri, self.problem = uri, problem

    def __reduce__(self) -> tuple[type, tuple[str, str]]:
        # Raised in a Ray worker (a model actor, a training worker), it is pickled to reach the driver;
        # unpickling calls the class with `args`, here the message alone, which this __init__ refuses.
        return type(self), (self.uri, self.problem)


@dataclass(frozen=True)
class Checkpoint:
    model: DenseIsoViT
    config: DenseIsoViTConfig
    sha256: str  # of the file's bytes: the model version
    uri: str


def save_checkpoint(model: DenseIsoViT, uri: str | os.PathLike, *, dtype: torch.dtype | None = None) -> str:
    """Write `model` (optionally cast to `dtype`, e.g. torch.float16 to halve the file) with its
    config to `uri`; returns the file's sha256. Local files appear whole or not at all."""
    uri = os.fspath(uri)
    tensors = {
        name: (t.detach().to(dtype) if dtype is not None and t.is_floating_point() else t.detach()).contiguous().cpu()
        for name, t in model.state_dict().items()
    }
    # One metadata entry only: safetensors writes its metadata map in no fixed order, and the
    # file's digest is the model version, so the same weights must always give the same bytes.
    data = safetensors.torch.save(tensors, metadata={CONFIG_KEY: model.config.to_json()})
    fs, path = fsspec.core.url_to_fs(uri)
    if not _is_local(fs):
        fs.pipe_file(path, data)  # object stores publish an object only once it is complete
        return hashlib.sha256(data).hexdigest()
    parent = os.path.dirname(path)
    if parent:
        os.makedirs(parent, exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, path)  # readers never see a half-written checkpoint
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return hashlib.sha256(data).hexdigest()


def _is_local(fs: fsspec.AbstractFileSystem) -> bool:
    protocols = (fs.protocol,) if isinstance(fs.protocol, str) else fs.protocol
    return "file" in protocols


def _read_metadata(uri: str, data: bytes) -> dict[str, str]:
    """The safetensors header's __metadata__. safetensors' Python API reads metadata only from a
    local file (safe_open), so the documented header (u64 little-endian length + JSON) is read here
    to serve every fsspec URI from the same bytes."""
    hint = ""
    if data[:4] == b"PK\x03\x04" or data[:1] == b"\x80":
        hint = " (it looks like a PyTorch pickle, which isosr never loads: re-save it with save_checkpoint)"
    if len(data) < 8:
        raise CheckpointError(uri, f"not a safetensors file: only {len(data)} bytes{hint}")
    (size,) = struct.unpack("<Q", data[:8])
    if size > len(data) - 8:
        raise CheckpointError(uri, f"not a safetensors file: header length {size} exceeds the file{hint}")
    try:
        header = json.loads(data[8 : 8 + size])
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise CheckpointError(uri, f"not a safetensors file: its header is not JSON{hint}") from None
    if not isinstance(header, dict):
        raise CheckpointError(uri, "not a safetensors file: its header is not a JSON object")
    metadata = header.get("__metadata__") or {}
    return metadata if isinstance(metadata, dict) else {}


def _canonical(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    for name, tensor in state.items():
        while name.startswith(_WRAPPER_PREFIXES):  # wrappers nest: _orig_mod.module.x
            name = name.split(".", 1)[1]
        out[name] = tensor
    return out


def _check_state(uri: str, expected: dict[str, torch.Tensor], got: dict[str, torch.Tensor]) -> None:
    missing = sorted(set(expected) - set(got))
    unexpected = sorted(set(got) - set(expected))
    wrong_shape = [
        f"{k} {tuple(got[k].shape)} (expected {tuple(expected[k].shape)})"
        for k in sorted(set(expected) & set(got))
        if got[k].shape != expected[k].shape
    ]
    problems = []
    for label, items in (("missing keys", missing), ("unexpected keys", unexpected), ("wrong shapes", wrong_shape)):
        if items:
            shown = ", ".join(items[:5]) + (f" and {len(items) - 5} more" if len(items) > 5 else "")
            problems.append(f"{len(items)} {label}: {shown}")
    if problems:
        raise CheckpointError(uri, "weights do not match the config in its metadata; " + "; ".join(problems))


def read_bytes(uri: str) -> bytes:
    """The file's bytes through fsspec; a missing file or a folder raises CheckpointError."""
    fs, path = fsspec.core.url_to_fs(uri)
    try:
        data = fs.cat_file(path)
    except (FileNotFoundError, IsADirectoryError):
        data = None
    if not data and fs.isdir(path):  # asked only on failure: over HTTP it would fetch the file
        raise CheckpointError(uri, "is a directory (or key prefix), not a .safetensors file")
    if data is None:
        raise CheckpointError(uri, "no such file; pass --checkpoint with a path or URI that exists")
    return data


def load_checkpoint(uri: str | os.PathLike, *, device: str | torch.device = "cpu") -> Checkpoint:
    """Build the network described by the checkpoint's config and load its weights, strictly.

    Raises CheckpointError (naming the file) for: no such file, not safetensors, no or bad config
    in the metadata, missing/unexpected keys or wrong shapes. Never unpickles.
    """
    uri = os.fspath(uri)
    data = read_bytes(uri)
    metadata = _read_metadata(uri, data)
    if CONFIG_KEY not in metadata:
        raise CheckpointError(
            uri,
            f"its metadata has no {CONFIG_KEY!r} entry, so the network it holds is unknown; save it with save_checkpoint",
        )
    try:
        config = DenseIsoViTConfig.from_json(metadata[CONFIG_KEY])
        with torch.device("meta"):  # shapes only: the weights below replace every tensor (no random init)
            model = DenseIsoViT(config)
    except Exception as e:  # noqa: BLE001 - any config the network cannot be built from
        raise CheckpointError(uri, f"bad {CONFIG_KEY!r} in its metadata: {e}") from None
    try:
        state = _canonical(safetensors.torch.load(data))
    except Exception as e:  # noqa: BLE001 - safetensors raises its own error types for corrupt payloads
        raise CheckpointError(uri, f"not a readable safetensors file: {e}") from None
    expected = model.state_dict()
    _check_state(uri, expected, state)
    # Each tensor copied out of the file's bytes (safetensors.torch.load gives views of immutable
    # bytes, which training would write into), in the network's own dtype (float16 files load as float32).
    state = {name: tensor.to(expected[name].dtype, copy=True) for name, tensor in state.items()}
    model.load_state_dict(state, strict=True, assign=True)
    return Checkpoint(model.to(device).eval(), config, hashlib.sha256(data).hexdigest(), uri)
