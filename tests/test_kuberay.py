"""The KubeRay manifests (jobs/kuberay): kinds and API versions KubeRay serves, the image docker/
builds, the shared volume, entrypoints that parse as real `dec-ray` commands naming real spec
files, the Serve application a RayService imports, and worker groups that hold the specs' scaling.
Not run against a Kubernetes cluster (see jobs/README.md)."""
import copy
import functools
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
    cluster = svc["spec"]["rayClusterConfig"]
    workers = cluster["workerGroupSpecs"][0]
    gpus = int(workers["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"])
    (deployment,) = a["deployments"]
    assert cluster["enableInTreeAutoscaling"] and a["args"]["gpu"]        # GPU pods follow Serve's replicas
    assert deployment["autoscaling_config"]["max_replicas"] <= workers["maxReplicas"] * gpus


def test_a_broken_entrypoint_is_caught():
    with pytest.raises(SystemExit):
        command("python -m dec_ray trian --tables /shared/tables --out /shared/runs/x")


# The KubeRay releases the manifests need (jobs/README.md): authOptions from 1.5.1, backoffLimit from
# 1.2.0. Their CRDs are not part of this repository: KUBERAY_CRDS names a folder holding each
# release's ray-operator/config/crd/bases files as KUBERAY_CRDS/vX.Y.Z/ray.io_*.yaml.
KUBERAY_VERSIONS = ("v1.5.1", "v1.7.0")
CRDS = os.environ.get("KUBERAY_CRDS", "")
CRD_FILES = {"RayCluster": "ray.io_rayclusters.yaml", "RayJob": "ray.io_rayjobs.yaml",
             "RayService": "ray.io_rayservices.yaml"}
needs_crds = pytest.mark.skipif(not CRDS, reason="KUBERAY_CRDS: a folder of KubeRay releases' CRDs (jobs/README.md)")


def structural(schema):
    """A CRD's openAPIV3Schema as a JSON schema that refuses what the API server refuses under
    `kubectl apply`'s strict field validation: a field the schema does not name (KubeRay's CRDs
    preserve no unknown fields); int-or-string and nullable as Kubernetes reads them."""
    s = {k: v for k, v in schema.items() if not k.startswith("x-kubernetes-") and k != "nullable"}
    if schema.get("x-kubernetes-int-or-string"):
        s.pop("type", None)
        s["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    if schema.get("nullable") and "type" in s:
        s["type"] = [s["type"], "null"]
    if "properties" in s:
        s["properties"] = {k: structural(v) for k, v in s["properties"].items()}
        if not schema.get("x-kubernetes-preserve-unknown-fields"):
            s.setdefault("additionalProperties", False)
    if isinstance(s.get("additionalProperties"), dict):
        s["additionalProperties"] = structural(s["additionalProperties"])
    if isinstance(s.get("items"), dict):
        s["items"] = structural(s["items"])
    return s


@functools.lru_cache(maxsize=None)
def crd_schema(version: str, kind: str):
    with open(os.path.join(CRDS, version, CRD_FILES[kind])) as f:
        crd = yaml.load(f, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))      # 1 MB files
    (v1,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    return structural(v1["schema"]["openAPIV3Schema"])


def crd_errors(version: str):
    import jsonschema
    out = {}
    for name, d in manifests().items():
        if d["kind"] in CRD_FILES:
            errors = list(jsonschema.Draft7Validator(crd_schema(version, d["kind"])).iter_errors(d))
            if errors:
                out[name] = [f"{'.'.join(map(str, e.absolute_path))}: {e.message[:120]}" for e in errors]
    return out


@needs_crds
@pytest.mark.parametrize("version", KUBERAY_VERSIONS)
def test_every_manifest_passes_the_crd_schema_of_each_kuberay_release_named(version):
    assert crd_errors(version) == {}
    import jsonschema                          # the check bites: a misspelt field is refused
    job = copy.deepcopy(manifests()["rayjob_ingest.yaml:dec-ray-ingest"])
    job["spec"]["backofLimit"] = job["spec"].pop("backoffLimit")
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(job, crd_schema(version, "RayJob"))


@needs_crds
def test_the_release_before_the_oldest_named_refuses_the_manifests():
    """What jobs/README.md says is the oldest KubeRay that takes the manifests is the oldest: every
    release in KUBERAY_CRDS before it refuses at least one (v1.5.0: authOptions; v1.1.0: backoffLimit)."""
    def key(v):
        return tuple(int(x) for x in v.lstrip("v").split("."))
    older = [v for v in os.listdir(CRDS) if v.startswith("v") and key(v) < key(KUBERAY_VERSIONS[0])]
    assert older, f"no release before {KUBERAY_VERSIONS[0]} in {CRDS}"
    for v in older:
        assert crd_errors(v), v
