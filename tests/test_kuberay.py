"""The KubeRay manifests (jobs/kuberay): kinds and API versions KubeRay serves, the image docker/
builds, the shared volume, entrypoints that parse as real `dec-ray` commands naming real spec
files, the Serve application a RayService imports, and worker groups that hold the specs' scaling.
Not run against a Kubernetes cluster (see jobs/README.md)."""
import os
import shlex

import pytest
import yaml

from dec_ray.cli import build_parser
from dec_ray.config import load_config
from dec_ray.service.experiment import config_path, load_spec

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KUBE = os.path.join(ROOT, "jobs", "kuberay")
IMAGE_ROOT = "/home/ray/dec_ray/"           # where docker/Dockerfile puts the repository's files
KINDS = {"RayCluster": "ray.io/v1", "RayJob": "ray.io/v1", "RayService": "ray.io/v1", "PersistentVolumeClaim": "v1"}


def manifests():
    out = {}
    for name in sorted(os.listdir(KUBE)):
        if name.endswith(".yaml"):
            for doc in yaml.safe_load_all(open(os.path.join(KUBE, name))):
                out[f"{name}:{doc['metadata']['name']}"] = doc
    return out


def pods(cluster_spec):
    yield "head", cluster_spec["headGroupSpec"]
    for g in cluster_spec["workerGroupSpecs"]:
        yield g["groupName"], g


def local(path: str) -> str:
    assert path.startswith(IMAGE_ROOT), path
    return os.path.join(ROOT, path[len(IMAGE_ROOT):])


def command(entrypoint: str):
    argv = shlex.split(entrypoint)
    assert argv[:3] == ["python", "-m", "dec_ray"], entrypoint
    return build_parser().parse_args(argv[3:])          # SystemExit on an unknown command or option


def test_every_manifest_is_a_kind_kuberay_serves_with_the_image_and_the_shared_volume():
    docs = manifests()
    image = yaml.safe_load(open(os.path.join(ROOT, "cluster.yaml")))["docker"]["image"]
    assert {d["kind"] for d in docs.values()} == set(KINDS)
    claim = next(d for d in docs.values() if d["kind"] == "PersistentVolumeClaim")
    assert claim["spec"]["accessModes"] == ["ReadWriteMany"]
    for name, d in docs.items():
        assert d["apiVersion"] == KINDS[d["kind"]], name
        spec = {"RayCluster": d["spec"], "RayService": d["spec"].get("rayClusterConfig")}.get(d["kind"])
        if spec is None:
            continue
        assert spec["rayVersion"] == "2.60.0" and spec["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
        for group, g in pods(spec):
            pod = g["template"]["spec"]
            c = pod["containers"][0]
            assert c["image"] == image, (name, group)
            mounts = {m["name"]: m["mountPath"] for m in c["volumeMounts"]}
            claims = {v["name"]: v.get("persistentVolumeClaim", {}).get("claimName") for v in pod["volumes"]}
            assert mounts["shared"] == "/shared" and claims["shared"] == claim["metadata"]["name"], (name, group)
            assert c["resources"]["limits"] == c["resources"]["requests"], (name, group)


def test_rayjobs_run_real_commands_on_the_raycluster_that_holds_their_scaling():
    docs = manifests()
    cluster = next(d for d in docs.values() if d["kind"] == "RayCluster")
    groups = {g: p for g, p in pods(cluster["spec"])}
    jobs = [d for d in docs.values() if d["kind"] == "RayJob"]
    assert {command(j["spec"]["entrypoint"]).command for j in jobs} == {"ingest", "train", "tune", "experiment"}
    gpu_group = groups["gpu-workers"]
    limits = gpu_group["template"]["spec"]["containers"][0]["resources"]["limits"]
    gpus_per_pod, cpus_per_pod = int(limits["nvidia.com/gpu"]), float(limits["cpu"])
    for j in jobs:
        assert j["spec"]["clusterSelector"]["ray.io/cluster"] == cluster["metadata"]["name"]
        args = command(j["spec"]["entrypoint"])
        for attr in ("config", "spec", "space"):
            if getattr(args, attr, None):
                assert os.path.exists(local(getattr(args, attr))), getattr(args, attr)
        if args.command == "experiment":
            spec = load_spec(local(args.spec))
            cfgs = [load_config(config_path(spec), spec.set)]
        elif args.command in ("train", "tune"):
            cfgs = [load_config(local(args.config))]
        else:
            continue
        for cfg in cfgs:                     # the GPU workers hold the run's workers, GPUs and CPUs
            s = cfg.scale
            assert s.use_gpu and s.workers <= gpu_group["maxReplicas"] * gpus_per_pod, j["metadata"]["name"]
            per_pod = min(s.workers, gpus_per_pod)
            assert per_pod * s.cpus_per_worker <= cpus_per_pod, j["metadata"]["name"]


def test_the_rayservice_imports_the_serve_application_with_its_arguments():
    import importlib
    from ray import serve
    svc = next(d for d in manifests().values() if d["kind"] == "RayService")
    apps = yaml.safe_load(svc["spec"]["serveConfigV2"])["applications"]
    (a,) = apps
    module, attr = a["import_path"].split(":")
    builder = getattr(importlib.import_module(module), attr)
    app = builder(a["args"])
    assert isinstance(app, serve.Application)
    assert a["args"]["run"].startswith("/shared/")
    workers = svc["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]
    gpus = int(workers["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"])
    assert a["args"]["replicas"] <= workers["maxReplicas"] * gpus


def test_a_broken_entrypoint_is_caught():
    with pytest.raises(SystemExit):
        command("python -m dec_ray trian --tables /shared/tables --out /shared/runs/x")
