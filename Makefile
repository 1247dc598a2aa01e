# Two user-facing targets: `make demo` and `make test`. Both create .venv when it is missing.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# The CPU build of torch. On the project's machines this version lies on disk as a CPU wheel,
# so it is taken before anything else can pull a multi-GB CUDA build. On a GPU node, install with
# `make install TORCH_SPEC=torch` (the CUDA build from PyPI) - see README "GPU install".
TORCH_SPEC ?= torch==2.13.0
TORCH_PIP_ARGS ?=
PIP := $(PY) -m pip install --disable-pip-version-check -q
DEMO_OUT ?= demo_out

.PHONY: install demo test bench clean
install: $(VENV)/.installed

$(VENV)/.installed: setup.cfg pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PIP) "$(TORCH_SPEC)" $(TORCH_PIP_ARGS) 2>&1 | grep -v "is ignored: it is neither" || true
	$(PY) -c "import torch"
	$(PIP) -e ".[dev]" 2>&1 | grep -v "is ignored: it is neither" || true
	$(PY) -c "import dec_ray, ray, faiss, librosa"
	$(PY) -c "from dec_ray.data.features import warm_up; warm_up()"   # librosa's numba cache, once
	touch $@

demo: install
	$(VENV)/bin/dec-ray demo --out $(DEMO_OUT)

# One session: every test on one local Ray, then (last, marker `cluster`) the tests that start Ray
# heads and nodes of their own. `pytest -m cluster` runs that group alone.
test: install
	$(PY) -m pytest

bench: install
	$(PY) bench/ingest.py && $(PY) bench/kmeans.py && $(PY) bench/train.py && $(PY) bench/predict.py && $(PY) bench/run_overhead.py

clean:
	rm -rf $(DEMO_OUT) .pytest_cache
