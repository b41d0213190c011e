"""The fast paths of model.inference against the plain float32 path: content-adaptive skipping,
out-of-memory back-off, channels-last, torch.compile and bf16 autocast."""

from __future__ import annotations

import numpy as np
import pytest
import skimage.data
import torch
import torch.nn.functional as F

from model.config import variant
from model.inference import TileUpscaler, compiled_size, load_model, tile_detail
from model.metrics import psnr
from model.network import DenseIsoViT
from model.tiling import upscale_array


def randomised_tiny(seed: int = 0) -> DenseIsoViT:
    """The tiny variant with a non-zero residual (the untrained one is exactly bilinear)."""
    torch.manual_seed(seed)
    model = DenseIsoViT(variant("tiny"))
    torch.nn.init.normal_(model.to_rgb.weight, std=0.05)
    return model.eval()


def textured_tiles(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).random((n, 3, 64, 64), dtype=np.float32)


def test_tile_detail_is_zero_for_flat_and_gradients_and_high_for_noise():
    flat = np.full((1, 3, 64, 64), 0.3, np.float32)
    ramp = np.broadcast_to(np.linspace(0, 1, 64, dtype=np.float32), (1, 3, 64, 64)).copy()  # 4 levels a pixel
    speck = flat.copy()
    speck[0, 1, 30, 30] = 1.0  # one bright pixel on one channel
    detail = tile_detail(np.concatenate([flat, ramp, speck, textured_tiles(1)]))
    assert detail[0] == 0
    assert detail[1] < 0.05  # a linear ramp has (almost) no detail however steep: its 3x3 mean is itself
    assert detail[2] == pytest.approx(0.7 * 255 * 16 / 9 / 4096, rel=1e-4)  # one speck is little detail: 0.08
    assert detail[3] > 50


def test_skipped_tiles_are_the_networks_skip_path_and_the_rest_are_untouched():
    model = randomised_tiny()
    tiles = textured_tiles(6)
    tiles[[1, 4]] = np.linspace(0.2, 0.25, 64, dtype=np.float32)  # smooth gradients: nothing to add
    reference = TileUpscaler(model, device="cpu", dtype="float32")(tiles)
    skipping = TileUpscaler(model, device="cpu", dtype="float32", skip_detail=0.5)
    out = skipping(tiles)

    assert (skipping.tiles_skipped, skipping.tiles_run) == (2, 4)
    busy = [0, 2, 3, 5]
    np.testing.assert_allclose(out[busy], reference[busy], atol=1e-6)  # same forward maths, smaller batch
    bilinear = F.interpolate(torch.from_numpy(tiles[[1, 4]]), scale_factor=4, mode="bilinear", align_corners=False)
    np.testing.assert_array_equal(out[[1, 4]], bilinear.numpy())
    assert np.abs(out[[1, 4]] - reference[[1, 4]]).max() > 1e-3  # the network would have changed them


def test_skipping_off_runs_every_tile():
    runner = TileUpscaler(randomised_tiny(), device="cpu", dtype="float32", skip_detail=0)
    runner(np.zeros((3, 3, 64, 64), np.float32))
    assert (runner.tiles_skipped, runner.tiles_run) == (0, 3)


def test_skipping_a_flat_sky_changes_only_the_sky_and_by_under_a_level():
    """A photo under a flat sky: the sky's tiles are skipped; the photo's tiles are not."""
    model = randomised_tiny()
    photo = skimage.data.astronaut()[::4, ::4]  # 128x128
    image = np.concatenate([np.full((96, 128, 3), (140, 170, 210), np.uint8), photo])
    reference = upscale_array(image, TileUpscaler(model, device="cpu", dtype="float32"))
    runner = TileUpscaler(model, device="cpu", dtype="float32", skip_detail=0.5)
    out = upscale_array(image, runner)
    assert runner.tiles_skipped >= 2
    diff = np.abs(out.astype(int) - reference.astype(int))
    photo_rows = (96 + 8) * 4  # past the last tile that overlaps the sky
    assert diff[photo_rows:].max() == 0
    # The first row of tiles is all sky and alone up to input row 58 (where its overlap ramps): the
    # skipped output is the sky's colour exactly, where this random network adds its noise.
    assert (out[: 56 * 4] == (140, 170, 210)).all()
    assert (reference[: 56 * 4] != (140, 170, 210)).any()


class OutOfMemoryAbove:
    """A TileModel stand-in for a GPU that fits `limit` tiles: larger batches raise torch's
    OutOfMemoryError, as a CUDA allocation would. (No GPU here to run out of memory on.)"""

    def __init__(self, model: DenseIsoViT, limit: int) -> None:
        self.model, self.limit, self.batches = model, limit, []

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        self.batches.append(len(x))
        if len(x) > self.limit:
            raise torch.OutOfMemoryError(f"CUDA out of memory (stand-in): {len(x)} tiles")
        return self.model(x)


def test_out_of_memory_halves_the_batch_and_computes_every_tile():
    model = randomised_tiny()
    tiles = textured_tiles(11)
    reference = TileUpscaler(model, device="cpu", dtype="float32")(tiles)
    runner = TileUpscaler(model, device="cpu", dtype="float32")
    runner.forward = OutOfMemoryAbove(model, limit=3)
    out = runner(tiles)
    np.testing.assert_allclose(out, reference, atol=1e-6)
    assert runner.max_batch == 2  # 11 -> 5 -> 2, then kept
    assert runner.forward.batches[:3] == [11, 5, 2]
    assert max(runner.forward.batches[3:]) <= 2
    assert runner.tiles_run == 11


def test_out_of_memory_at_one_tile_raises_rather_than_returning_a_wrong_tile():
    model = randomised_tiny()
    runner = TileUpscaler(model, device="cpu", dtype="float32")
    runner.forward = OutOfMemoryAbove(model, limit=0)
    with pytest.raises(torch.OutOfMemoryError):
        runner(textured_tiles(4))


def test_cpu_batch_size_is_the_measured_best():
    assert TileUpscaler(randomised_tiny(), device="cpu").batch_size() == 8


def test_channels_last_gives_the_same_output():
    model = randomised_tiny()
    x = torch.from_numpy(textured_tiles(3))
    with torch.inference_mode():
        expected = model(x)
        model = model.to(memory_format=torch.channels_last)
        got = model(x.contiguous(memory_format=torch.channels_last))
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


def test_a_compiled_network_runs_a_few_batch_shapes():
    assert [compiled_size(n, 1024) for n in (1, 64, 65, 81, 300, 513, 1024)] == [64, 64, 128, 128, 512, 1024, 1024]
    assert {compiled_size(n, 8) for n in range(1, 9)} == {1, 2, 4, 8}
    assert {compiled_size(n, 936) for n in range(1, 937)} == {59, 117, 234, 468, 936}
    assert compiled_size(9, 8) == 9  # more than the largest batch: as it is


@pytest.mark.slow
def test_compiled_network_gives_the_same_output_and_compiles_once_per_padded_shape():
    """Batches of 8, 3, 5, 7 and 6 tiles (a pipeline call's last batch has any size) compile twice,
    for 8 and 4 tiles, not five times (~10 s each here), and give the eager network's outputs."""
    from torch._dynamo.utils import counters

    model = randomised_tiny()
    eager = TileUpscaler(model, device="cpu", dtype="float32")
    compiled = TileUpscaler(model, device="cpu", dtype="float32", compile=True)
    compiled.largest_batch = 8
    graphs = counters["stats"]["unique_graphs"]
    for n in (8, 3, 5, 7, 6):
        tiles = textured_tiles(n, seed=n)
        got = compiled(tiles)
        assert got.shape == (n, 3, 256, 256)
        np.testing.assert_allclose(got, eager(tiles), atol=1e-5)
    assert counters["stats"]["unique_graphs"] - graphs == 2
    assert compiled.tiles_run == 29


def test_bf16_output_is_within_a_level_of_float32_on_a_photo():
    """bf16 autocast, the GPU default, against float32 with the shipped weights: measured max 1
    level of 255 on this photo, PSNR 61.5 dB between the two."""
    model = load_model(None).model
    photo = skimage.data.astronaut()[::4, ::4]
    a = upscale_array(photo, TileUpscaler(model, device="cpu", dtype="float32"))
    b = upscale_array(photo, TileUpscaler(model, device="cpu", dtype="bfloat16"))
    assert np.abs(a.astype(int) - b.astype(int)).max() <= 2
    assert psnr(b, a) >= 50


@pytest.mark.cluster
def test_cpu_model_actors_reuse_their_memory_instead_of_faulting_it_in_every_batch(ray_local: None) -> None:
    """A CPU model actor's malloc settings (the runtime_env pipeline.run gives it): forward batches
    after the first two take next to no page faults, where glibc's defaults fault every activation's
    pages in again, each zeroed by the kernel (~12 % of a full-model actor's time, RESULTS.md).
    Measured over 8 batches: 286,000-335,000 faults with the defaults, 0-8,196 with the settings (now
    and then the heap takes one more 32 MiB: 8,192 pages), so the bound below leaves room for two."""
    import ray

    from pipeline.stages import MODEL_ENV, MODEL_TUNABLES

    class ForwardPasses:
        """Forward batches of the small network, called from a thread of the actor's own as Ray
        Data calls a model actor, and the page faults they take. (Defined here: Ray ships it by value.)"""

        def __init__(self) -> None:
            torch.set_num_threads(1)
            torch.manual_seed(0)
            self.model = DenseIsoViT(variant("small")).eval()
            self.tiles = torch.rand(8, 3, 64, 64)

        def faults(self, batches: int) -> tuple[int, str]:
            """Page faults of this thread (not Ray's own threads) in `batches` batches after two."""
            import os
            import resource

            with torch.inference_mode():
                for _ in range(2):  # the first batches take their memory from the kernel in any case
                    self.model(self.tiles)
                before = resource.getrusage(resource.RUSAGE_THREAD).ru_minflt
                for _ in range(batches):
                    self.model(self.tiles)
            return resource.getrusage(resource.RUSAGE_THREAD).ru_minflt - before, os.environ.get("GLIBC_TUNABLES", "")

    actor = ray.remote(num_cpus=1, max_concurrency=2)(ForwardPasses)
    default, tuned = actor.remote(), actor.options(runtime_env={"env_vars": MODEL_ENV}).remote()
    (default_faults, _), (tuned_faults, tunables) = ray.get([default.faults.remote(8), tuned.faults.remote(8)])
    assert tunables == MODEL_TUNABLES + ":"  # Ray put the node's own in, none here: nothing
    assert default_faults > 100_000, default_faults
    assert tuned_faults < default_faults / 10, (tuned_faults, default_faults)
