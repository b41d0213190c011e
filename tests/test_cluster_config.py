"""cluster.yaml, as Ray's cluster launcher reads it, without AWS: Ray's own defaults and schema
(`prepare_config` then `validate_config`, what `ray up` runs before the provider's bootstrap, which
is what needs AWS and is not called here), and what a user of the file would notice.

What a user would notice: `ray up` refusing the file; GPU nodes billed while no job runs, or never
given back; a GPU on the head; a GPU type whose size the autoscaler has to guess; the job command
in the file's header disagreeing with the cluster it describes; a node without the project
installed; Ray's image at another version than the one the project pins; a secret in the file.
"""

from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Any

import pytest
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

from pipeline.run import RunOptions, UsageError, place

ROOT = Path(__file__).resolve().parents[1]
CLUSTER_YAML = ROOT / "cluster.yaml"
MAX_IDLE_MINUTES = 10  # an idle GPU node costs money every minute it stays up


@pytest.fixture(scope="module")
def text() -> str:
    return CLUSTER_YAML.read_text()


@pytest.fixture(scope="module")
def raw(text: str) -> dict[str, Any]:
    return yaml.safe_load(text)


@pytest.fixture(scope="module")
def config(raw: dict[str, Any]) -> dict[str, Any]:
    """The file as `ray up` sees it: merged with Ray's AWS defaults and validated by Ray's schema."""
    prepared = prepare_config(copy.deepcopy(raw))
    validate_config(prepared)
    return prepared


def gpu_types(config: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {name: t for name, t in config["available_node_types"].items() if t["resources"].get("GPU", 0) > 0}


def documented_max_workers(text: str) -> int:
    """The --max-workers of the job command in the file's header."""
    found = re.findall(r"--max-workers (\d+)", text)
    assert found, "cluster.yaml's header shows no job command with --max-workers"
    assert len(set(found)) == 1, f"cluster.yaml documents different --max-workers values: {found}"
    return int(found[0])


def test_ray_accepts_the_file_with_its_own_schema(config: dict[str, Any]) -> None:
    assert config["provider"]["type"] == "aws"
    assert config["head_node_type"] in config["available_node_types"]


def test_gpu_workers_scale_from_zero_to_the_documented_bound(config: dict[str, Any], text: str) -> None:
    gpus = gpu_types(config)
    assert gpus, "cluster.yaml has no worker type with a GPU"
    for name, node_type in gpus.items():
        assert node_type["min_workers"] == 0, f"{name}: GPU nodes would be billed while no job runs"
    total = sum(t["max_workers"] * t["resources"]["GPU"] for t in gpus.values())
    assert documented_max_workers(text) == total == 8, "the job's --max-workers must match the GPUs the cluster may add"
    assert config["max_workers"] >= sum(t["max_workers"] for t in gpus.values()), (
        "the global bound cuts the GPU types short"
    )


def test_idle_nodes_are_given_back(raw: dict[str, Any]) -> None:
    minutes = raw.get("idle_timeout_minutes")  # the file's own value, not Ray's default
    assert minutes is not None, "idle_timeout_minutes is not set"
    assert 0 < minutes <= MAX_IDLE_MINUTES


def test_gpu_types_declare_their_resources_and_leave_cpus_beside_the_model(raw: dict[str, Any]) -> None:
    declared = {name: t.get("resources", {}) for name, t in raw["available_node_types"].items()}
    gpus = {name: r for name, r in declared.items() if r.get("GPU", 0) > 0}
    assert gpus
    for name, resources in gpus.items():
        assert set(resources) >= {"CPU", "GPU"}, f"{name}: declare CPU and GPU, so the autoscaler need not guess"
        # The model actor holds one CPU per GPU; decoding and encoding need the rest.
        assert resources["CPU"] >= 2 * resources["GPU"], f"{name}: no CPU left beside the model actors"


def test_the_head_has_no_gpu_and_takes_no_pipeline_work(config: dict[str, Any]) -> None:
    head = config["available_node_types"][config["head_node_type"]]
    assert head["resources"].get("GPU", 0) == 0
    assert head["resources"].get("CPU") == 0, "pipeline tasks would land on the head"
    assert head["max_workers"] == 0


def test_a_job_on_the_empty_cluster_asks_for_gpu_actors(config: dict[str, Any], text: str) -> None:
    """What `place()` decides at the start of the header's job, when only the head is up."""
    head = config["available_node_types"][config["head_node_type"]]
    at_start = {k: float(v) for k, v in head["resources"].items()}
    n = documented_max_workers(text)
    placement = place(RunOptions(src="s3://in", dst="s3://out", gpus_per_worker=1, max_workers=n), at_start)
    assert placement.gpus == 1.0
    assert placement.workers == (1, n)
    with pytest.raises(UsageError, match=rf"{n} with cluster.yaml"):  # the error names the file's bound
        place(RunOptions(src="s3://in", dst="s3://out", gpus_per_worker=1), at_start)


def test_every_node_installs_the_project(config: dict[str, Any]) -> None:
    assert config["file_mounts"].get("~/isosr") == ".", "the working tree is not mounted at ~/isosr"
    install = re.compile(r"pip install .*-c ~/isosr/constraints\.txt -e ~/isosr\b")
    assert any(install.search(c) for c in config["head_setup_commands"]), "the head does not install isosr"
    for name, node_type in config["available_node_types"].items():
        if name == config["head_node_type"]:
            continue
        commands = node_type.get("worker_setup_commands", config["worker_setup_commands"])
        assert any(install.search(c) for c in commands), f"{name} does not install isosr"
        assert any(re.search(r"pip install .*\btorch\b", c) for c in commands), f"{name} does not install torch"


def test_ray_images_match_the_pinned_ray(config: dict[str, Any]) -> None:
    pinned = re.search(r"^ray==(\S+)$", (ROOT / "constraints.txt").read_text(), re.MULTILINE)
    assert pinned, "constraints.txt pins no ray version"
    images = [config["docker"]["image"]] + [
        t["docker"]["worker_image"] for t in config["available_node_types"].values() if "docker" in t
    ]
    for image in images:
        assert re.fullmatch(rf"rayproject/ray:{re.escape(pinned[1])}-py311-(cpu|gpu)", image), image
    for name, node_type in gpu_types(config).items():
        assert node_type["docker"]["worker_image"].endswith("-gpu"), f"{name} runs the CPU image"


def test_credentials_come_from_instance_profiles_never_the_file(config: dict[str, Any], text: str) -> None:
    for name in ("aws_access_key_id", "aws_secret_access_key", "aws_session_token"):
        assert name not in text.lower(), f"cluster.yaml holds {name}"
    assert not re.search(r"\b(AKIA|ASIA)[0-9A-Z]{16}\b", text), "cluster.yaml holds an AWS access key id"
    for name, node_type in config["available_node_types"].items():
        assert "IamInstanceProfile" in node_type["node_config"], f"{name} has no instance profile, so no S3 access"
