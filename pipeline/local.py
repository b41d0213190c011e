"""Upscale a local file or folder on this machine, in one process: the single-machine path of
`isosr upscale`. Relative paths are mirrored under DST; outputs appear whole or not at all."""

from __future__ import annotations

import os
import sys
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

import numpy as np

from model.tiling import TileModel, upscale_arrays
from pipeline.images import FORMATS, OUTPUT_SUFFIX, DecodeError, decode, encode


@dataclass(frozen=True)
class Source:
    path: Path
    relative: Path  # where it lands under DST, before the suffix is changed


@dataclass
class Summary:
    inputs: int = 0
    ok: int = 0
    failed: list[tuple[str, str]] = field(default_factory=list)  # (input, error)
    megapixels_in: float = 0.0
    megapixels_out: float = 0.0
    seconds: float = 0.0

    def lines(self) -> list[str]:
        rate = self.megapixels_out / self.seconds if self.seconds else 0.0
        out = [
            f"inputs {self.inputs}, ok {self.ok}, failed {len(self.failed)}",
            f"{self.megapixels_in:.2f} MP in -> {self.megapixels_out:.2f} MP out in {self.seconds:.1f} s "
            f"({rate:.2f} output MP/s)",
        ]
        out += [f"FAILED {path}: {error}" for path, error in self.failed]
        return out


def list_sources(src: Path, dst: Path) -> list[Source]:
    """Image files under `src` (or `src` itself), sorted, skipping anything inside `dst`.
    Raises FileNotFoundError if `src` does not exist."""
    if not src.exists():
        raise FileNotFoundError(f"input {src} does not exist")
    if src.is_file():
        return [Source(src, Path(src.name))]
    dst = dst.resolve()
    found = []
    for path in sorted(src.rglob("*")):
        if path.suffix.lower() in FORMATS and path.is_file() and not path.resolve().is_relative_to(dst):
            found.append(Source(path, path.relative_to(src)))
    return found


def output_path(dst: Path, source: Source, fmt: str) -> Path:
    return dst / source.relative.with_suffix(OUTPUT_SUFFIX[fmt])


def write_atomic(path: Path, data: bytes) -> None:
    """Write to a temporary name beside `path`, then rename: readers never see half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def upscale_folder(
    src: Path,
    dst: Path,
    model: TileModel,
    *,
    halo: int,
    batch_size: int,
    output_format: str | None = None,
    max_pixels: int | None = None,
    log: TextIO | None = None,
) -> Summary:
    """Upscale every image under `src` into `dst`. A file that cannot be decoded is reported in the
    summary and the rest go on. Progress lines go to `log` (default: stderr)."""
    log = log or sys.stderr
    sources = list_sources(src, dst)
    summary = Summary(inputs=len(sources))
    started = time.perf_counter()
    decoded: deque[tuple[Source, str, bytes | None, float]] = deque()  # in step with the tiler's outputs

    def arrays() -> Iterator[np.ndarray]:
        for source in sources:
            t0 = time.perf_counter()
            try:
                image = decode(source.path.read_bytes(), name=str(source.path), max_pixels=max_pixels)
            except (DecodeError, OSError) as e:
                summary.failed.append((str(source.path), str(e)))
                print(f"[{len(summary.failed) + summary.ok}/{summary.inputs}] FAILED {e}", file=log, flush=True)
                continue
            decoded.append((source, output_format or image.format, image.icc_profile, t0))
            summary.megapixels_in += image.pixels.shape[0] * image.pixels.shape[1] / 1e6
            yield image.pixels

    for out in upscale_arrays(arrays(), model, halo=halo, batch_size=batch_size):
        source, fmt, icc, t0 = decoded.popleft()
        target = output_path(dst, source, fmt)
        write_atomic(target, encode(out, fmt, icc_profile=icc))
        summary.ok += 1
        summary.megapixels_out += out.shape[0] * out.shape[1] / 1e6
        print(
            f"[{summary.ok + len(summary.failed)}/{summary.inputs}] {source.relative} -> {target} "
            f"({out.shape[1]}x{out.shape[0]}, {time.perf_counter() - t0:.1f} s)",
            file=log,
            flush=True,
        )
    summary.seconds = time.perf_counter() - started
    return summary
