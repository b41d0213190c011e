"""Tests for model.checkpoint: safetensors checkpoints carrying their config, loaded from any fsspec URI.

What a user would notice: a reloaded model that computes something else, a version hash that does
not match the file, a checkpoint that cannot be read over http:// or s3://, an error that does not
say which file is wrong and why, a pickle that gets executed, a half-written file left behind.
All on CPU with the "tiny" variant; the whole file runs in a few seconds.
"""

from __future__ import annotations

import dataclasses
import errno
import functools
import hashlib
import http.server
import json
import os
import re
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path

import fsspec
import numpy as np
import pytest
import safetensors
import safetensors.torch
import torch
import torch.nn.functional as F
from torch import nn

import model.checkpoint as ckmod
from model.checkpoint import CONFIG_KEY, Checkpoint, CheckpointError, load_checkpoint, save_checkpoint
from model.config import VARIANTS, DenseIsoViTConfig, variant
from model.network import DenseIsoViT

TINY = variant("tiny")


# ----------------------------------------------------------------------------- helpers


def random_model(config: DenseIsoViTConfig = TINY, seed: int = 0) -> DenseIsoViT:
    """A model with every weight random (to_rgb included), so outputs depend on all of them."""
    m = DenseIsoViT(config).eval()
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in m.parameters():
            nn.init.normal_(p, std=0.02)
    return m


def batch(config: DenseIsoViTConfig = TINY, seed: int = 1234) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand((2, config.in_channels, config.tile_size, config.tile_size), generator=g)


def forward(m: nn.Module, x: torch.Tensor) -> torch.Tensor:
    m.eval()
    with torch.no_grad():
        return m(x)


def file_bytes(uri: str) -> bytes:
    with fsspec.open(uri, "rb") as f:
        return f.read()


def state_of(m: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().contiguous().clone() for k, v in m.state_dict().items()}


def write_safetensors(path: Path, tensors: dict[str, torch.Tensor], config_json: str | None) -> str:
    """A safetensors file written by safetensors itself (not save_checkpoint)."""
    metadata = {"format": "pt"}
    if config_json is not None:
        metadata[CONFIG_KEY] = config_json
    safetensors.torch.save_file(tensors, str(path), metadata=metadata)
    return str(path)


def raises_checkpoint_error(uri: str, problem: str):
    """CheckpointError whose message names the file and (regex `problem`) the problem."""
    return pytest.raises(CheckpointError, match=re.escape(uri) + ".*" + problem)


@pytest.fixture
def memory_dir() -> Iterator[str]:
    """A fresh memory:// folder, removed afterwards (the memory filesystem is process-global)."""
    root = f"memory://isosr-test-{uuid.uuid4().hex}"
    yield root
    fs = fsspec.filesystem("memory")
    path = fs._strip_protocol(root)
    if fs.exists(path):
        fs.rm(path, recursive=True)


# ----------------------------------------------------------------------------- 1. round trip


@pytest.mark.parametrize("where", ["local-str", "local-pathlike", "local-file-uri", "memory"])
def test_save_load_round_trip_is_bit_identical(where: str, tmp_path: Path, memory_dir: str) -> None:
    m = random_model()
    x = batch()
    expected = forward(m, x)
    if where == "local-str":
        uri = str(tmp_path / "m.safetensors")
    elif where == "local-pathlike":
        uri = tmp_path / "m.safetensors"
    elif where == "local-file-uri":
        uri = (tmp_path / "m.safetensors").as_uri()
    else:
        uri = f"{memory_dir}/nested/dir/m.safetensors"  # parents are created

    digest = save_checkpoint(m, uri)
    ckpt = load_checkpoint(uri)

    assert isinstance(ckpt, Checkpoint)
    assert ckpt.uri == os.fspath(uri)
    assert ckpt.config == m.config
    assert ckpt.model.config == m.config
    assert not ckpt.model.training  # ready for inference
    # The version recorded in manifests is the sha256 of the file's bytes, the same at save and load.
    assert re.fullmatch(r"[0-9a-f]{64}", digest)
    assert digest == ckpt.sha256 == hashlib.sha256(file_bytes(os.fspath(uri))).hexdigest()
    # Every weight and every output bit survives.
    got_state = ckpt.model.state_dict()
    for name, tensor in m.state_dict().items():
        assert got_state[name].dtype == tensor.dtype == torch.float32, name
        assert torch.equal(got_state[name], tensor), name
    assert torch.equal(forward(ckpt.model, x), expected)


def test_config_travels_with_the_file(tmp_path: Path) -> None:
    """A non-default architecture is rebuilt from the file's metadata alone, not from a default."""
    config = dataclasses.replace(TINY, depths=(1, 2, 1, 1), qkv_bias=False, layer_norm_eps=1e-5)
    assert config not in VARIANTS.values()
    m = random_model(config, seed=3)
    uri = str(tmp_path / "custom.safetensors")
    save_checkpoint(m, uri)

    ckpt = load_checkpoint(uri)

    assert ckpt.config == config
    assert len(ckpt.model.stages[1].blocks) == 2
    assert ckpt.model.stages[0].blocks[0].attn.qkv.bias is None
    x = batch(config)
    assert torch.equal(forward(ckpt.model, x), forward(m, x))


def test_different_weights_different_version(tmp_path: Path) -> None:
    a = save_checkpoint(random_model(seed=0), tmp_path / "a.safetensors")
    b = save_checkpoint(random_model(seed=1), tmp_path / "b.safetensors")
    assert a != b


def test_same_weights_same_version(memory_dir: str) -> None:
    m = random_model(seed=0)
    # 16 saves: if the order were a coin flip per save, all 16 agree with probability 2**-15.
    digests = {save_checkpoint(m, f"{memory_dir}/m{i}.safetensors") for i in range(16)}
    assert len(digests) == 1, digests


# ----------------------------------------------------------------------------- 2. fp16


def test_fp16_save_halves_the_file_and_stays_close(tmp_path: Path) -> None:
    m = random_model()
    x = batch()
    expected = forward(m, x)
    skip = F.interpolate(x, scale_factor=TINY.scale, mode="bilinear", align_corners=False)
    # The comparison is meaningful only if the network adds a visible residual to the bilinear skip
    # (measured: max |residual| = 0.039).
    assert (expected - skip).abs().max().item() > 1e-2

    fp32 = tmp_path / "m32.safetensors"
    fp16 = tmp_path / "m16.safetensors"
    save_checkpoint(m, fp32)
    digest16 = save_checkpoint(m, fp16, dtype=torch.float16)

    # Measured ratio 0.510 (the JSON header does not halve).
    ratio = fp16.stat().st_size / fp32.stat().st_size
    assert 0.45 < ratio < 0.55, ratio
    with safetensors.safe_open(str(fp16), framework="pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"F16"}  # noqa: SIM118 - safe_open is not iterable

    ckpt = load_checkpoint(fp16)
    assert ckpt.sha256 == digest16
    assert all(p.dtype == torch.float32 for p in ckpt.model.parameters())  # runs in fp32 after loading
    got = forward(ckpt.model, x)
    diff = (got - expected).abs()
    # Measured: max |diff| = 7.6e-6, mean 2.5e-6 (fp16 rounding of the weights, outputs in [0, 1]).
    assert diff.max().item() < 3e-5, diff.max().item()
    assert diff.mean().item() < 1e-5, diff.mean().item()
    assert not torch.equal(got, expected)  # the weights really were rounded


# ----------------------------------------------------------------------------- 3. HTTP


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture
def http_dir(tmp_path: Path) -> Iterator[tuple[Path, str]]:
    """(folder, base URL): a real HTTP server on 127.0.0.1 serving `folder`."""
    folder = tmp_path / "served"
    folder.mkdir()
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_QuietHandler, directory=str(folder)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield folder, f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


@pytest.mark.timeout(60)
def test_load_over_http(http_dir: tuple[Path, str]) -> None:
    folder, base = http_dir
    m = random_model()
    digest = save_checkpoint(m, folder / "x.safetensors")

    ckpt = load_checkpoint(f"{base}/x.safetensors")

    assert ckpt.sha256 == digest
    assert ckpt.config == m.config
    x = batch()
    assert torch.equal(forward(ckpt.model, x), forward(m, x))


@pytest.mark.timeout(60)
def test_http_errors_are_checkpoint_errors(http_dir: tuple[Path, str]) -> None:
    folder, base = http_dir
    (folder / "sub").mkdir()
    missing = f"{base}/nope.safetensors"
    with raises_checkpoint_error(missing, "no such file"):
        load_checkpoint(missing)
    listing = f"{base}/sub/"  # the server answers with an HTML directory listing
    with raises_checkpoint_error(listing, "not a safetensors file"):
        load_checkpoint(listing)


# ----------------------------------------------------------------------------- 4. S3


@pytest.mark.timeout(60)
def test_save_and_load_on_s3(s3_bucket: tuple[str, object]) -> None:
    bucket, client = s3_bucket
    m = random_model()
    uri = f"s3://{bucket}/ck/m.safetensors"

    digest = save_checkpoint(m, uri)
    ckpt = load_checkpoint(uri)

    # The object really is on the local endpoint (asked with an explicit endpoint, not the env),
    # i.e. s3fs honoured AWS_ENDPOINT_URL.
    body = client.get_object(Bucket=bucket, Key="ck/m.safetensors")["Body"].read()
    assert hashlib.sha256(body).hexdigest() == digest == ckpt.sha256
    assert ckpt.config == m.config
    x = batch()
    assert torch.equal(forward(ckpt.model, x), forward(m, x))

    missing = f"s3://{bucket}/ck/nope.safetensors"
    with raises_checkpoint_error(missing, "no such file"):
        load_checkpoint(missing)


# ----------------------------------------------------------------------------- 5. errors


def test_checkpoint_error_is_a_value_error() -> None:
    assert issubclass(CheckpointError, ValueError)
    e = CheckpointError("some/uri", "a problem")
    assert e.uri == "some/uri"
    assert "some/uri" in str(e) and "a problem" in str(e)


def test_a_checkpoint_error_raised_in_a_ray_worker_reaches_the_driver_intact() -> None:
    """Ray pickles a worker's exception for the driver; unpickling one that Python rebuilt from its
    message alone failed with a TypeError that hid the file and the problem."""
    import pickle

    e = pickle.loads(pickle.dumps(CheckpointError("ckpt/tiny.safetensors", "no such file")))
    assert type(e) is CheckpointError and e.uri == "ckpt/tiny.safetensors" and e.problem == "no such file"
    assert str(e) == "checkpoint ckpt/tiny.safetensors: no such file"


def test_missing_file_local(tmp_path: Path) -> None:
    uri = str(tmp_path / "nope.safetensors")
    with raises_checkpoint_error(uri, "no such file"):
        load_checkpoint(uri)


def test_missing_file_memory(memory_dir: str) -> None:
    uri = f"{memory_dir}/nope.safetensors"
    with raises_checkpoint_error(uri, "no such file"):
        load_checkpoint(uri)


def test_directory_local(tmp_path: Path) -> None:
    (tmp_path / "d").mkdir()
    uri = str(tmp_path / "d")
    with raises_checkpoint_error(uri, "is a directory"):
        load_checkpoint(uri)


def test_directory_memory(memory_dir: str) -> None:
    save_checkpoint(random_model(), f"{memory_dir}/d/m.safetensors")  # creates the folder d
    uri = f"{memory_dir}/d"  # the folder passed instead of the file
    with raises_checkpoint_error(uri, "is a directory"):
        load_checkpoint(uri)


@pytest.mark.parametrize(
    ("name", "content", "problem"),
    [
        ("text", b"this is a README, not weights\n" * 4, "not a safetensors file"),
        ("empty", b"", "not a safetensors file: only 0 bytes"),
        ("four-bytes", b"abcd", "not a safetensors file: only 4 bytes"),
        ("random", np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes(), "not a safetensors file"),
        ("header-not-json", (16).to_bytes(8, "little") + b"\xff\xfe not json at all!!", "header is not JSON"),
        ("header-not-object", (2).to_bytes(8, "little") + b"[]", "header is not a JSON object"),
    ],
)
def test_not_safetensors(name: str, content: bytes, problem: str, tmp_path: Path) -> None:
    path = tmp_path / f"{name}.safetensors"
    path.write_bytes(content)
    with raises_checkpoint_error(str(path), problem):
        load_checkpoint(path)


def test_truncated_safetensors(tmp_path: Path) -> None:
    good = tmp_path / "good.safetensors"
    save_checkpoint(random_model(), good)
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(good.read_bytes()[:-1000])  # header intact, tensor data short
    with raises_checkpoint_error(str(cut), "not a readable safetensors file"):
        load_checkpoint(cut)


class _Payload:
    """Unpickling this creates `marker` (a directory): proof that something was unpickled."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


@pytest.mark.parametrize("zipfile_format", [True, False], ids=["zip", "legacy"])
def test_torch_pickle_is_refused_and_never_unpickled(zipfile_format: bool, tmp_path: Path) -> None:
    m = random_model()
    marker = tmp_path / "UNPICKLED"
    path = tmp_path / "model.pt"
    torch.save(
        {"state_dict": m.state_dict(), "extra": _Payload(marker)},
        path,
        _use_new_zipfile_serialization=zipfile_format,
    )
    # Control: the payload is live, unpickling the file does create the marker.
    torch.load(path, weights_only=False)
    assert marker.exists()
    marker.rmdir()

    with raises_checkpoint_error(str(path), "not a safetensors file.*pickle"):
        load_checkpoint(path)
    assert not marker.exists()


def test_plain_pickle_of_state_dict_is_refused(tmp_path: Path) -> None:
    """The exact thing a user is likely to try: torch.save(model.state_dict(), path)."""
    path = tmp_path / "model.safetensors"  # even with the right extension
    torch.save(random_model().state_dict(), path)
    with raises_checkpoint_error(str(path), "pickle"):
        load_checkpoint(path)


def test_safetensors_without_config(tmp_path: Path) -> None:
    uri = write_safetensors(tmp_path / "bare.safetensors", state_of(random_model()), config_json=None)
    with raises_checkpoint_error(uri, re.escape(repr(CONFIG_KEY)) + ".*network it holds is unknown"):
        load_checkpoint(uri)


def _config_with(**changes: object) -> str:
    raw = json.loads(TINY.to_json())
    raw.update(changes)
    return json.dumps(raw)


@pytest.mark.parametrize(
    ("name", "config_json", "problem"),
    [
        ("not-json", "{this is not json", "bad 'isosr.config'"),
        ("not-object", "[1, 2, 3]", "bad 'isosr.config'.*must be an object"),
        ("unknown-field", _config_with(dropout=0.1), r"bad 'isosr.config'.*unknown fields \['dropout'\]"),
        ("invalid-heads", _config_with(num_heads=[3, 2, 2, 2]), "bad 'isosr.config'.*not divisible"),
        ("stage-count", _config_with(depths=[1, 1, 1]), "bad 'isosr.config'.*one entry per stage"),
        ("wrong-type", _config_with(embed_dims=5), "bad 'isosr.config'"),
    ],
)
def test_bad_config(name: str, config_json: str, problem: str, tmp_path: Path) -> None:
    uri = write_safetensors(tmp_path / f"{name}.safetensors", state_of(random_model()), config_json)
    with raises_checkpoint_error(uri, problem):
        load_checkpoint(uri)


@pytest.mark.parametrize(
    "changes",
    [{"patch_size": 0}, {"num_heads": [0, 2, 2, 2]}, {"embed_dims": [-16, 24, 24, 32]}, {"depths": [1.5, 1, 1, 1]}],
    ids=["patch-0", "heads-0", "negative-dim", "float-depth"],
)
def test_nonsense_config_values_are_checkpoint_errors(changes: dict, tmp_path: Path) -> None:
    uri = write_safetensors(tmp_path / "nonsense.safetensors", state_of(random_model()), _config_with(**changes))
    with raises_checkpoint_error(uri, "config"):
        load_checkpoint(uri)


def test_missing_key_is_named(tmp_path: Path) -> None:
    state = state_of(random_model())
    del state["fusion.weight"]
    uri = write_safetensors(tmp_path / "missing.safetensors", state, TINY.to_json())
    with raises_checkpoint_error(uri, r"1 missing keys: fusion\.weight"):
        load_checkpoint(uri)


def test_extra_key_is_named(tmp_path: Path) -> None:
    state = state_of(random_model())
    state["head.extra_bias"] = torch.zeros(3)
    uri = write_safetensors(tmp_path / "extra.safetensors", state, TINY.to_json())
    with raises_checkpoint_error(uri, r"1 unexpected keys: head\.extra_bias"):
        load_checkpoint(uri)


def test_wrong_shape_is_named(tmp_path: Path) -> None:
    state = state_of(random_model())
    state["pos_embed"] = state["pos_embed"].reshape(TINY.grid_size**2, TINY.embed_dims[0]).contiguous()
    uri = write_safetensors(tmp_path / "shape.safetensors", state, TINY.to_json())
    with raises_checkpoint_error(uri, r"wrong shapes: pos_embed \(256, 16\) \(expected \(1, 256, 16\)\)"):
        load_checkpoint(uri)


def test_weights_of_another_variant_are_refused(tmp_path: Path) -> None:
    """Tiny weights under a config claiming other dims: every mismatch is reported, none loaded."""
    other = dataclasses.replace(TINY, embed_dims=(16, 24, 24, 48), num_heads=(2, 2, 2, 2))
    uri = write_safetensors(tmp_path / "mislabelled.safetensors", state_of(random_model()), other.to_json())
    with raises_checkpoint_error(uri, r"wrong shapes: .*and \d+ more"):
        load_checkpoint(uri)


# ----------------------------------------------------------------------------- wrapper prefixes


@pytest.mark.parametrize(
    "prefix",
    [
        "module.",  # DistributedDataParallel
        "_orig_mod.",  # torch.compile
        "module._orig_mod.",  # DDP around a compiled model
        "_orig_mod.module.",  # torch.compile(DDP(model)): compile applied to the DDP wrapper
    ],
)
def test_wrapper_prefixes_load(prefix: str, tmp_path: Path) -> None:
    m = random_model()
    state = {prefix + k: v for k, v in state_of(m).items()}
    uri = write_safetensors(tmp_path / "wrapped.safetensors", state, TINY.to_json())

    ckpt = load_checkpoint(uri)

    x = batch()
    assert torch.equal(forward(ckpt.model, x), forward(m, x))


def test_save_a_compiled_model(tmp_path: Path) -> None:
    """save_checkpoint(torch.compile(model)) (lazy: nothing is compiled) loads into a plain model."""
    m = random_model()
    compiled = torch.compile(m)
    assert next(iter(compiled.state_dict())).startswith("_orig_mod.")
    uri = tmp_path / "compiled.safetensors"
    save_checkpoint(compiled, uri)

    ckpt = load_checkpoint(uri)

    x = batch()
    assert torch.equal(forward(ckpt.model, x), forward(m, x))


# ----------------------------------------------------------------------------- 6. atomic local save


def test_local_save_leaves_no_temporary_files(tmp_path: Path) -> None:
    target = tmp_path / "m.safetensors"
    save_checkpoint(random_model(seed=0), target)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.safetensors"]
    # Overwriting an existing checkpoint: still one file, now the new one.
    digest = save_checkpoint(random_model(seed=1), target)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.safetensors"]
    assert hashlib.sha256(target.read_bytes()).hexdigest() == digest
    assert not list(tmp_path.glob("*.tmp-*"))


class _DiskFullFile:
    """Writes the first half of what it is given, then fails like a full disk."""

    def __init__(self, real, on_write) -> None:
        self._real = real
        self._on_write = on_write

    def write(self, data: bytes) -> int:
        self._real.write(data[: len(data) // 2])
        self._real.flush()
        self._on_write()
        raise OSError(errno.ENOSPC, "No space left on device")

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self._real.close()


@pytest.fixture
def fail_writes(monkeypatch: pytest.MonkeyPatch):
    """Call it to make the checkpoint module's local writes fail halfway from then on; it returns a
    list that receives what the target held at the moment of each failure (None: no file)."""
    seen: list[bytes | None] = []

    def fake_open(path, mode="r", *args, **kwargs):
        real = open(path, mode, *args, **kwargs)  # noqa: SIM115 - handed back open, as open() does
        if "w" not in mode:
            return real
        target = Path(str(path).split(".tmp-")[0])
        return _DiskFullFile(real, lambda: seen.append(target.read_bytes() if target.exists() else None))

    def arm() -> list[bytes | None]:
        monkeypatch.setattr(ckmod, "open", fake_open, raising=False)
        return seen

    return arm


def test_failed_local_save_keeps_the_previous_checkpoint(tmp_path: Path, fail_writes) -> None:
    target = tmp_path / "m.safetensors"
    old_digest = save_checkpoint(random_model(seed=0), target)
    old = target.read_bytes()
    disk_full = fail_writes()

    with pytest.raises(OSError, match="No space left"):
        save_checkpoint(random_model(seed=1), target)

    assert disk_full == [old]  # while half-written, readers still saw the whole old file
    assert target.read_bytes() == old
    assert load_checkpoint(target).sha256 == old_digest


def test_failed_local_save_of_a_new_file_leaves_nothing_named_like_it(tmp_path: Path, fail_writes) -> None:
    target = tmp_path / "m.safetensors"
    disk_full = fail_writes()
    with pytest.raises(OSError, match="No space left"):
        save_checkpoint(random_model(), target)
    assert disk_full == [None]
    assert not target.exists()


def test_failed_local_save_cleans_up_its_temporary_file(tmp_path: Path, fail_writes) -> None:
    fail_writes()
    with pytest.raises(OSError, match="No space left"):
        save_checkpoint(random_model(), tmp_path / "m.safetensors")
    assert not list(tmp_path.glob("*.tmp-*"))
