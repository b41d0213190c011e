"""The training job (jobs/train.py): crop sampling, the schedule, and real Ray Train runs of the tiny
variant that lower the loss, resume after a SIGKILL, and leave a checkpoint the pipeline uses."""

from __future__ import annotations

import itertools
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from jobs.train import CropSampler, Recipe, degrade, learning_rate, make_optimizer, train_step
from model.checkpoint import load_checkpoint, save_checkpoint
from model.network import DenseIsoViT

ROOT = Path(__file__).resolve().parent.parent
PHOTOS = ("astronaut", "chelsea", "coffee", "rocket")


def _coordinates(h: int, w: int, ident: int) -> np.ndarray:
    """A photo whose pixel (y, x) is (y, x, ident): every crop says where it came from."""
    y, x = np.mgrid[:h, :w]
    return np.stack([y, x, np.full_like(y, ident)], axis=-1).astype(np.uint8)


def test_crops_are_flipped_and_rotated_windows_of_the_photos_drawn_by_area() -> None:
    photos = [_coordinates(200, 250, 0), _coordinates(130, 130, 1)]
    sampler = CropSampler(photos, crop=64, seed=0)
    batch = sampler.batch(400)
    assert batch.shape == (400, 64, 64, 3) and batch.dtype == np.uint8
    orientations = set()
    for crop in batch:
        photo = photos[crop[0, 0, 2]]
        matches = []
        for k in range(4):
            for flip in (False, True):
                undone = np.rot90(crop, -k)
                undone = undone[:, ::-1] if flip else undone
                y0, x0 = undone[0, 0, :2]
                if np.array_equal(undone, photo[y0 : y0 + 64, x0 : x0 + 64]):
                    matches.append((k, flip))
        assert matches, "a crop that is no flip/rotation of a window of its photo"
        orientations.add(matches[0])
    assert len(orientations) == 8  # all four rotations, flipped and not
    # Drawn in proportion to area: 50,000 vs 16,900 px -> 74.7 % from the first photo.
    assert abs((batch[:, 0, 0, 2] == 0).mean() - 50000 / 66900) < 0.06


def test_learning_rate_warms_up_then_decays_to_the_floor() -> None:
    r = Recipe(data="", val=None, steps=1000, warmup=100, lr=1e-3, min_lr=1e-5)
    rates = [learning_rate(s, r) for s in range(1000)]
    assert rates[0] == pytest.approx(1e-5) and rates[99] == pytest.approx(1e-3)
    assert all(a <= b for a, b in itertools.pairwise(rates[:100]))  # warm-up rises
    assert all(a >= b for a, b in itertools.pairwise(rates[100:]))  # cosine falls
    assert learning_rate(1000, r) == pytest.approx(1e-5)


def test_degradation_is_the_quality_checks_bicubic_on_the_8_bit_grid() -> None:
    from model.metrics import bicubic_downscale_array

    hr = np.random.default_rng(2).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    ours = degrade(torch.from_numpy(hr).permute(2, 0, 1)[None].float() / 255)[0].permute(1, 2, 0).numpy() * 255
    assert np.abs(ours - bicubic_downscale_array(hr).astype(np.float64)).max() < 1e-3


def _fixed_batch_loss(model: DenseIsoViT, photos: list[np.ndarray], batch: torch.Tensor | None = None) -> float:
    """L1 on the same crops for every model: an exact comparison, not a noisy training loss."""
    batch = torch.from_numpy(CropSampler(photos, crop=256, seed=123).batch(32)) if batch is None else batch
    hr = batch.permute(0, 3, 1, 2).float() / 255
    with torch.no_grad():
        return float(torch.nn.functional.l1_loss(model.eval()(degrade(hr)), hr))


def test_a_few_steps_lower_the_loss(tiny_checkpoint: str) -> None:
    """Ten steps on one batch of real photo crops, from the tiny checkpoint whose residual is noise
    (the untrained network is exactly bilinear; ten steps cannot beat that, but must remove noise)."""
    import copy

    import skimage.data

    torch.manual_seed(0)
    photos = [skimage.data.astronaut(), skimage.data.coffee()]
    hr = torch.from_numpy(CropSampler(photos, crop=256, seed=0).batch(4))
    model = load_checkpoint(tiny_checkpoint).model
    ema = copy.deepcopy(model)
    recipe = Recipe(data="", val=None, steps=1000, warmup=1, lr=3e-3)  # ten steps at about lr
    optimizer = make_optimizer(model, recipe)
    losses = [train_step(model, ema, optimizer, hr, step=s, recipe=recipe, dtype="float32") for s in range(10)]
    lr_input = degrade(hr.permute(0, 3, 1, 2).float() / 255)
    bilinear = float(F.l1_loss(F.interpolate(lr_input, scale_factor=4, mode="bilinear"), hr.permute(0, 3, 1, 2) / 255))
    # Measured: 0.0308 -> 0.0299 against bilinear's 0.0297, i.e. 86 % of the noise's excess gone.
    assert losses[-1] - bilinear < 0.5 * (losses[0] - bilinear), (losses, bilinear)
    assert _fixed_batch_loss(ema, photos, hr) < _fixed_batch_loss(load_checkpoint(tiny_checkpoint).model, photos, hr)


@pytest.fixture(scope="module")
def photo_folders(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    import skimage.data

    root = tmp_path_factory.mktemp("photos")
    for split, names in (("train", PHOTOS), ("val", ("camera",))):
        (root / split).mkdir()
        for name in names:
            pixels = getattr(skimage.data, name)()
            Image.fromarray(pixels).convert("RGB").save(root / split / f"{name}.png")
    return root / "train", root / "val"


def _train_command(data: Path, val: Path, storage: Path, init: str, *extra: str) -> list[str]:
    return [
        sys.executable, str(ROOT / "jobs" / "train.py"), "train", "--data", str(data), "--val", str(val),
        "--storage", str(storage), "--name", "tiny-test", "--init", init, "--steps", "40",
        "--batch-size", "8", "--lr", "3e-3", "--warmup", "4", "--precision", "float32", "--log-every", "5",
        "--val-every", "20", "--val-max-side", "256", "--checkpoint-every", "10", *extra,
    ]  # fmt: skip


def _registered(storage: Path) -> bool:
    """Ray Train has recorded a checkpoint in its snapshot, which is what a rerun resumes from (the
    checkpoint's folder appears a moment before: a kill in between leaves nothing to resume)."""
    snapshot = storage / "tiny-test" / "checkpoint_manager_snapshot.json"
    try:
        return json.loads(snapshot.read_text()).get("latest_checkpoint_result") is not None
    except (FileNotFoundError, json.JSONDecodeError):
        return False


def _checkpoints(storage: Path) -> list[Path]:
    return sorted(p.parent for p in (storage / "tiny-test").glob("checkpoint_*/model.safetensors"))


@pytest.mark.slow
@pytest.mark.cluster
def test_training_lowers_the_loss_resumes_after_sigkill_and_ships_a_checkpoint(
    photo_folders: tuple[Path, Path], tiny_checkpoint: str, tmp_path: Path
) -> None:
    """Fine-tunes the tiny variant from a checkpoint whose residual is noise (the untrained network
    is exactly bilinear, and a few steps cannot beat that; they can remove noise). Every path is given
    relative to the command's working folder, as a user types them: Ray Train runs the loop in a
    folder of its own, where they name nothing unless the job makes them absolute first."""
    data, val = photo_folders
    storage = tmp_path / "runs"
    env = {**os.environ, "RAY_TRAIN_ENABLE_PRINT_PATCH": "0"}
    command = _train_command(*(Path(os.path.relpath(p, tmp_path)) for p in (data, val, storage, tiny_checkpoint)))

    # Run 1: SIGKILLed (driver, Ray and all) once its first checkpoint is on storage.
    first = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=tmp_path, start_new_session=True,
    )  # fmt: skip
    deadline = time.monotonic() + 240
    while not _registered(storage) and first.poll() is None and time.monotonic() < deadline:
        time.sleep(0.5)
    assert first.poll() is None, f"run 1 ended before its first checkpoint:\n{first.communicate()[0][-3000:]}"
    assert _checkpoints(storage), "no checkpoint within 240 s"
    os.killpg(first.pid, signal.SIGKILL)
    first.communicate()

    # Run 2: the same command resumes from the latest checkpoint and finishes.
    export = tmp_path / "exported.safetensors"
    second = subprocess.run(
        [*command, "--export", str(export)], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=400, check=False,
    )  # fmt: skip
    log = second.stdout + second.stderr
    assert second.returncode == 0, log[-3000:]
    resumed = re.search(r"resumed from \S+ at step (\d+)", log)
    assert resumed, log[-3000:]
    killed_at = int(resumed.group(1))
    assert killed_at in (10, 20, 30)  # a checkpoint step
    steps_run = [int(s) for s in re.findall(r"step (\d+)/40", log)]
    assert steps_run and min(steps_run) > killed_at and max(steps_run) == 40  # nothing redone, all done
    assert "validation PSNR-Y" in log
    assert f"fine-tuning {tiny_checkpoint}" in log  # --init reached the recipe the workers train, made absolute
    assert '"variant": "tiny"' in log  # the recipe names the checkpoint's variant, not --variant's default

    # Training went on from the checkpoint: the final EMA weights beat the noisy starting point.
    train_photos = [np.asarray(Image.open(p).convert("RGB")) for p in sorted(data.glob("*.png"))]
    final = load_checkpoint(str(_checkpoints(storage)[-1] / "model.safetensors")).model
    start = _fixed_batch_loss(load_checkpoint(tiny_checkpoint).model, train_photos)
    assert _fixed_batch_loss(final, train_photos) < start

    # The float16 export round-trips and the pipeline upscales with it.
    exported = load_checkpoint(str(export))
    assert all(t.dtype == torch.float32 for t in exported.model.state_dict().values())  # loaded back as float32
    again = tmp_path / "again.safetensors"
    assert save_checkpoint(exported.model, again, dtype=torch.float16) == exported.sha256
    out = tmp_path / "out"
    run = subprocess.run(
        [sys.executable, "-m", "pipeline.cli", "upscale", str(val), str(out), "--checkpoint", str(export)],
        capture_output=True, text=True, cwd=ROOT, timeout=300, check=False,
    )  # fmt: skip
    assert run.returncode in (0, 3), run.stderr[-3000:]
    with Image.open(out / "camera.png") as img:
        assert img.size == (2048, 2048)
