"""Build the training set from real photos that are available offline.

    python jobs/prepare_data.py DEST [--mate-deb PATH] [--no-mate]

Writes lossless PNGs to DEST/train/ and DEST/val/ (DEST: a folder or any fsspec URI, e.g.
s3://bucket/isosr-data). Sources:
- scikit-image's bundled photos (colour and greyscale; synthetic charts and drawings left out);
- the twelve nature photos (1280-2560 px) of Debian's `mate-backgrounds` package, fetched with
  `apt-get download` from the Debian archive (or taken from `--mate-deb`), unpacked with dpkg-deb.

The validation split is a fixed list of whole photos, so training never sees any crop of them and
the figures in RESULTS.md can be reproduced: four mate photos of different kinds (sand, a macro
shot, a stormy sky, a flower) and two scikit-image photos (a portrait, a still life). The two
motorcycle photos are a stereo pair of one scene; both stay on the training side.
"""

from __future__ import annotations

import argparse
import io
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

import numpy as np
from PIL import Image

from pipeline import storage

SKIMAGE_PHOTOS = (
    "astronaut.png",
    "chelsea.png",
    "coffee.png",
    "rocket.jpg",
    "hubble_deep_field.jpg",
    "ihc.png",
    "retina.jpg",
    "motorcycle_left.png",
    "motorcycle_right.png",
    # greyscale photos and scans (trained on as grey RGB)
    "camera.png",
    "moon.png",
    "coins.png",
    "brick.png",
    "grass.png",
    "gravel.png",
    "page.png",
)
MATE_DIR = "usr/share/backgrounds/mate/nature"
VALIDATION = frozenset(
    {
        "mate-Dune",
        "mate-LadyBird",
        "mate-Storm",
        "mate-YellowFlower",
        "skimage-astronaut",
        "skimage-coffee",
    }
)


def skimage_photos() -> dict[str, Path]:
    import skimage

    folder = Path(skimage.__file__).parent / "data"
    found = {f"skimage-{Path(n).stem}": folder / n for n in SKIMAGE_PHOTOS if (folder / n).exists()}
    missing = sorted(set(SKIMAGE_PHOTOS) - {p.name for p in found.values()})
    if missing:
        print(f"note: scikit-image lacks {', '.join(missing)}; going on without them", file=sys.stderr)
    return found


def mate_photos(workdir: Path, deb: Path | None) -> dict[str, Path]:
    if deb is None:
        result = subprocess.run(
            ["apt-get", "download", "mate-backgrounds"], cwd=workdir, capture_output=True, text=True, check=False
        )
        debs = sorted(workdir.glob("mate-backgrounds_*.deb"))
        if not debs:
            raise SystemExit(
                "could not download Debian's mate-backgrounds package with `apt-get download "
                f"mate-backgrounds` ({result.stderr.strip() or 'no .deb appeared'}); pass the .deb "
                "with --mate-deb PATH, or --no-mate to build the set from scikit-image's photos alone"
            )
        deb = debs[0]
    subprocess.run(["dpkg-deb", "-x", str(deb), str(workdir / "x")], check=True)
    folder = workdir / "x" / MATE_DIR
    photos = {f"mate-{p.stem}": p for p in sorted(folder.glob("*.jpg"))}
    if not photos:
        raise SystemExit(f"{deb} holds no photos under /{MATE_DIR}")
    return photos


def as_png(path: Path) -> bytes:
    with Image.open(path) as img:
        img.load()
        rgb = img.convert("RGB")
    out = io.BytesIO()
    Image.fromarray(np.asarray(rgb)).save(out, format="PNG", compress_level=3)
    return out.getvalue()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("dest", help="folder or fsspec URI to write train/ and val/ under")
    parser.add_argument("--mate-deb", type=Path, help="a downloaded mate-backgrounds .deb to use instead of apt-get")
    parser.add_argument("--no-mate", action="store_true", help="scikit-image photos only")
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory() as tmp:
        photos = skimage_photos()
        if not args.no_mate:
            photos |= mate_photos(Path(tmp), args.mate_deb)
        counts = {"train": 0, "val": 0}
        for name, path in sorted(photos.items()):
            split = "val" if name in VALIDATION else "train"
            storage.write_atomic(storage.join(args.dest, f"{split}/{name}.png"), as_png(path))
            counts[split] += 1
    print(f"wrote {counts['train']} training and {counts['val']} validation photos under {args.dest}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
