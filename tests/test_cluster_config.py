"""cluster.yaml passes Ray's own launcher validation; docker/ and jobs/ stay in step with setup.cfg."""
import configparser
import copy
import os
import re

import jsonschema
import pytest
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

from dec_ray.config import load_config
from dec_ray.service.experiment import config_path, load_spec

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _setup_cfg():
    cp = configparser.ConfigParser()
    cp.read(os.path.join(ROOT, "setup.cfg"))
    return cp


def _dockerfile_args():
    text = open(os.path.join(ROOT, "docker", "Dockerfile")).read()
    return dict(re.findall(r'^ARG (\w+)="?([^"\n]+)"?$', text, re.M)), text


def _cluster():
    with open(os.path.join(ROOT, "cluster.yaml")) as f:
        return yaml.safe_load(f)


def test_cluster_yaml_passes_rays_validation():
    cfg = prepare_config(_cluster())          # what `ray up` does before it validates
    validate_config(cfg)
    types = cfg["available_node_types"]
    assert types["gpu_worker"]["resources"].get("GPU", 0) > 0 and types["head"]["resources"]["CPU"] == 0
    assert types["cpu_worker"]["max_workers"] > 0 and cfg["docker"]["image"]


def test_validation_catches_a_broken_cluster_yaml():
    bad = copy.deepcopy(_cluster())
    bad["available_node_types"]["gpu_worker"]["min_workers"] = "four"
    with pytest.raises(jsonschema.ValidationError):
        validate_config(prepare_config(bad))


def test_docker_image_is_in_step_with_setup_cfg_and_makefile():
    cp, (args, text) = _setup_cfg(), _dockerfile_args()
    deps = cp["options"]["install_requires"]
    ray_pin = re.search(r"ray\[[^\]]*\]==([\d.]+)", deps).group(1)
    assert args["RAY_VERSION"] == ray_pin
    assert "FROM rayproject/ray:${RAY_VERSION}-${PYTHON_TAG}-gpu" in text
    py = args["PYTHON_TAG"].removeprefix("py")
    need = re.search(r">=\s*3\.(\d+)", cp["options"]["python_requires"]).group(1)
    assert py.startswith("3") and int(py[1:]) >= int(need)
    assert args["FAISS_GPU_SPEC"] == cp["options.extras_require"]["gpu"].strip()
    makefile = open(os.path.join(ROOT, "Makefile")).read()
    assert f"TORCH_SPEC ?= torch=={args['TORCH_VERSION']}" in makefile
    image_tag = _cluster()["docker"]["image"].rsplit(":", 1)[1]
    assert image_tag == cp["metadata"]["version"]


def test_every_job_config_loads_and_every_documented_file_exists():
    jobs = os.path.join(ROOT, "jobs")
    for name in os.listdir(jobs):
        path = os.path.join(jobs, name)
        if name.startswith("experiment_"):                 # an experiment spec and the config it names
            spec = load_spec(path)
            load_config(config_path(spec), spec.set)
        elif name.endswith(".yaml") and not name.endswith("_space.yaml"):
            load_config(path)                              # typed: an unknown key fails here
    readme = open(os.path.join(jobs, "README.md")).read() + open(os.path.join(ROOT, "README.md")).read()
    for ref in set(re.findall(r"jobs/[\w./-]+\.(?:yaml|sh)", readme)):
        assert os.path.exists(os.path.join(ROOT, ref)), ref


def test_operations_defaults_are_not_open_by_default():
    head = " ".join(_cluster()["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head and "0.0.0.0" not in head      # dashboard + job API
    _, text = _dockerfile_args()
    users = re.findall(r"^USER (\w+)", text, re.M)
    assert users and users[-1] == "ray" and "/etc/sudoers" in text               # runs as ray, without sudo
