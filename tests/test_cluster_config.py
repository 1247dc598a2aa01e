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


DOCKERFILE = os.path.join(ROOT, "docker", "Dockerfile")


def _dockerfile_args():
    """Every ARG's default, as Docker's own parser reads the file (the `dockerfile` package wraps it)."""
    import dockerfile
    args = {}
    for c in dockerfile.parse_file(DOCKERFILE):
        if c.cmd == "ARG" and "=" in c.value[0]:
            k, v = c.value[0].split("=", 1)
            args[k] = v.strip('"')
    return args, open(DOCKERFILE).read()


# what the base image's environment and Docker itself define in every stage
BUILD_ENV = {"HOME", "PATH", "TARGETPLATFORM", "TARGETOS", "TARGETARCH", "BUILDPLATFORM"}


def variables_out_of_scope(path: str):
    """(line, instruction, variable) for each variable a stage reads that the stage does not
    declare (ARG or ENV) before it: an ARG before FROM is only in scope for FROM lines, so a stage
    that reads it without declaring it again gets an empty string, as Docker builds it."""
    import dockerfile
    out, scope, global_args = [], None, set()
    for c in dockerfile.parse_file(path):
        text = " ".join(c.value)
        used = set(re.findall(r"\$\{(\w+)[^}]*\}|\$(\w+)", text))
        used = {a or b for a, b in used}
        if c.cmd == "FROM":
            out += [(c.start_line, c.cmd, v) for v in used - global_args]
            scope = set(BUILD_ENV)
            continue
        if scope is None:                                    # before the first FROM
            if c.cmd == "ARG":
                global_args.add(c.value[0].split("=", 1)[0])
            continue
        if c.cmd == "RUN":                                    # shell variables the command sets itself
            used -= set(re.findall(r"(?:^|[;&|(]\s*|\bfor\s+)(\w+)=", text))
        out += [(c.start_line, c.cmd, v) for v in sorted(used - scope)]
        if c.cmd == "ARG":
            scope.add(c.value[0].split("=", 1)[0])
        elif c.cmd == "ENV":
            scope.update(c.value[0::2])
    return out


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
    assert "FROM rayproject/ray:${RAY_VERSION}-${PYTHON_TAG}-${CUDA_TAG}" in text
    py = args["PYTHON_TAG"].removeprefix("py")
    need = re.search(r">=\s*3\.(\d+)", cp["options"]["python_requires"]).group(1)
    assert py.startswith("3") and int(py[1:]) >= int(need)
    assert args["FAISS_GPU_SPEC"] == cp["options.extras_require"]["gpu"].strip()
    makefile = open(os.path.join(ROOT, "Makefile")).read()
    assert f"TORCH_SPEC ?= torch=={args['TORCH_VERSION']}" in makefile
    image_tag = _cluster()["docker"]["image"].rsplit(":", 1)[1]
    assert image_tag == cp["metadata"]["version"]


def test_every_variable_a_dockerfile_stage_reads_is_in_scope_there(tmp_path):
    assert variables_out_of_scope(DOCKERFILE) == []
    broken = tmp_path / "Dockerfile"                         # the image as it was before issue 40
    broken.write_text("ARG RAY_VERSION=2.60.0\nFROM rayproject/ray:${RAY_VERSION}-py311-gpu\n"
                      "RUN python -c \"import ray; assert ray.__version__ == '${RAY_VERSION}'\"\n")
    assert variables_out_of_scope(str(broken)) == [(3, "RUN", "RAY_VERSION")]


def test_the_image_is_built_on_one_cuda_major():
    """The base image's CUDA, torch's wheel index and the faiss-gpu wheels name one CUDA major, and
    the build checks the installed libraries for it (docker/check_image.py)."""
    args, text = _dockerfile_args()
    major = args["CUDA_MAJOR"]
    assert re.fullmatch(r"cu(\d+)", args["CUDA_TAG"]).group(1).startswith(major)             # cu121: 12
    assert re.search(r"/whl/cu(\d+)$", args["TORCH_INDEX"]).group(1).startswith(major)       # cu126: 12
    # Meta's faiss-gpu wheels 1.14.3-1.15.x are CUDA 12 builds (faiss-gpu-cuvs is the CUDA 13 one)
    assert major == "12" and args["FAISS_GPU_SPEC"] == "faiss-gpu>=1.14.3,<1.16"
    assert 'python docker/check_image.py "${RAY_VERSION}" "${CUDA_MAJOR}"' in text
    from importlib.util import module_from_spec, spec_from_file_location
    spec = spec_from_file_location("check_image", os.path.join(ROOT, "docker", "check_image.py"))
    check = module_from_spec(spec)
    spec.loader.exec_module(check)
    assert check.other_cuda(major) == []           # this machine's CPU torch: no CUDA packages at all
    ignored = open(os.path.join(ROOT, ".dockerignore")).read().split()
    assert {".venv", ".git", "demo_out"} <= set(ignored)


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
