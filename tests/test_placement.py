"""Where the model actors go (pipeline.run.place), from the options and the cluster's resources at
the start of a run. No Ray needed: place() reads a resources dict like `ray.cluster_resources()`.

What a user would notice: a GPU cluster that runs the model on CPUs; an autoscaling cluster whose GPU
workers start from zero never adding one (the run decided "CPU-only" because no GPU was up yet);
actors that take every CPU and stall decoding; a bad option accepted, or refused without saying
which option to change.
"""

from __future__ import annotations

import pytest

from pipeline.run import Placement, RunOptions, UsageError, place

# ray.cluster_resources() of the clusters users have, at the start of a run.
LAPTOP = {"CPU": 2.0}
GPU_BOX = {"CPU": 16.0, "GPU": 2.0}
AUTOSCALING_AT_ZERO = {"CPU": 0.0}  # cluster.yaml: a head with CPU 0, no worker up yet
AUTOSCALING_FAKE_AT_ZERO = {"CPU": 2.0}  # tests/test_autoscaling.py: a 2-CPU head, no worker up yet


def options(**kwargs: object) -> RunOptions:
    return RunOptions(src="in", dst="out", **kwargs)


def test_cpu_only_runs_one_single_threaded_actor_per_cpu() -> None:
    assert place(options(), LAPTOP) == Placement(gpus=0.0, cpus=0.5, threads=1, workers=(2, 2))


def test_gpus_up_get_one_actor_each_by_default() -> None:
    assert place(options(), GPU_BOX) == Placement(gpus=1.0, cpus=1.0, threads=None, workers=(1, 2))
    assert place(options(gpus_per_worker=0.5), GPU_BOX).workers == (1, 4)


@pytest.mark.parametrize("resources", [AUTOSCALING_AT_ZERO, AUTOSCALING_FAKE_AT_ZERO])
def test_explicit_gpus_ask_for_gpu_actors_before_any_gpu_node_is_up(resources: dict[str, float]) -> None:
    placement = place(options(gpus_per_worker=1, max_workers=8), resources)
    assert placement.gpus == 1.0, "the run fell back to CPU actors, so the autoscaler would never add a GPU node"
    assert placement.workers == (1, 8)
    assert place(options(gpus_per_worker=1, min_workers=2, max_workers=8), resources).workers == (2, 8)


def test_without_gpus_up_the_bound_must_be_given() -> None:
    with pytest.raises(UsageError, match=r"--max-workers") as error:
        place(options(gpus_per_worker=1), AUTOSCALING_AT_ZERO)
    assert "0 GPUs up" in str(error.value)


def test_a_local_ray_without_gpus_refuses_gpu_actors_instead_of_waiting_forever() -> None:
    with pytest.raises(UsageError, match=r"leave out --gpus-per-worker") as error:
        place(options(gpus_per_worker=1, max_workers=2), LAPTOP, fixed=True)
    assert "cannot add any" in str(error.value)
    # The same machine without the option runs on its CPUs.
    assert place(options(), LAPTOP, fixed=True).gpus == 0.0


def test_an_empty_cluster_without_gpu_actors_says_how_to_get_them() -> None:
    with pytest.raises(UsageError, match=r"--gpus-per-worker 1 --max-workers N"):
        place(options(), AUTOSCALING_AT_ZERO)


def test_actors_that_would_hold_every_cpu_are_refused() -> None:
    with pytest.raises(UsageError, match=r"lower --min-workers"):
        place(options(min_workers=4, max_workers=4), LAPTOP)
    # One GPU actor holds one of the 2 CPUs of the tests' local Ray: room is left.
    assert place(options(), {"CPU": 2.0, "GPU": 1.0}).workers == (1, 1)
    with pytest.raises(UsageError, match=r"lower --min-workers"):
        place(options(), {"CPU": 1.0, "GPU": 1.0})


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"gpus_per_worker": -1}, r"--gpus-per-worker must be 0 or more, got -1"),
        ({"min_workers": 3, "max_workers": 2}, r"--min-workers 3 is above --max-workers 2"),
    ],
)
def test_bad_worker_options_name_the_option(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(UsageError, match=message):
        place(options(**kwargs), GPU_BOX)
