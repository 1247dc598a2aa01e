"""The image's build check (docker/Dockerfile runs it): the Ray version pinned, torch built for the
CUDA major the image names, faiss with its GPU code, and every CUDA library pip installed of that
same major, so that torch and faiss load one CUDA in one process.

    python docker/check_image.py RAY_VERSION CUDA_MAJOR
"""
import importlib.metadata
import sys

NOT_CUDA = {"nvidia-ml-py"}          # NVML bindings (GPU monitoring), no CUDA runtime


def other_cuda(major: str):
    """Installed nvidia-* CUDA packages not of this major (CUDA 12's are named *-cu12; CUDA 13's
    carry no suffix), and the cuda-toolkit meta-package if it names another major."""
    bad = []
    for d in importlib.metadata.distributions():
        name = (d.metadata["Name"] or "").lower()
        if name.startswith("nvidia-") and name not in NOT_CUDA and not name.endswith(f"-cu{major}"):
            bad.append(f"{name}=={d.version}")
        if name == "cuda-toolkit" and d.version.split(".")[0] != major:
            bad.append(f"{name}=={d.version}")
    return bad


def main(ray_version: str, major: str) -> None:
    import faiss
    import ray
    import torch
    assert ray.__version__ == ray_version, f"ray {ray.__version__}, the image names {ray_version}"
    assert torch.version.cuda and torch.version.cuda.split(".")[0] == major, f"torch for CUDA {torch.version.cuda}"
    assert hasattr(faiss, "StandardGpuResources"), "faiss without its GPU code (faiss-cpu still installed?)"
    bad = other_cuda(major)
    assert not bad, f"CUDA libraries of another major than {major}: {bad}"
    print(f"image: ray {ray.__version__}, torch {torch.__version__} (CUDA {torch.version.cuda}), faiss {faiss.__version__}")


if __name__ == "__main__":
    main(*sys.argv[1:3])
