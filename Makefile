# Two commands for a new user: `make reproduce` and `make test`. Both create .venv on first use.
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
JUPYTER_OVERRIDES := $(VENV)/share/jupyter/lab/settings/overrides.json

.PHONY: setup reproduce reproduce-wide reproduce-phase reproduce-lagrangian test test-fast bench clean wheelhouse gpu-dry-run

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	@command -v $(PYTHON) >/dev/null || { echo "error: $(PYTHON) not found; install Python 3.11 or run 'make PYTHON=python3.x ...'"; exit 1; }
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev,ray]'
	$(PY) -m ipykernel install --sys-prefix --name amanlib --display-name "amanlib (.venv)"
	# JupyterLab saves widget state with the notebook, so a reopened notebook shows its widgets, not errors
	mkdir -p $(VENV)/share/jupyter/lab/settings
	echo '{"@jupyter-widgets/jupyterlab-manager:plugin": {"saveState": true}}' > $(JUPYTER_OVERRIDES)
	touch $(STAMP)

# The authors' magnification checkpoint: $AMANLIB_MAGNET_CHECKPOINT, else the reference copy when present,
# else ~/.cache/amanlib (downloaded and verified on first use). ARGS passes options, e.g. ARGS="-p epochs 10".
REFERENCE ?= $(or $(AMANLIB_REFERENCE),../shared/reference)
MAGNET_REF := $(abspath $(REFERENCE)/magnet/learning_based_mag.pth.tar)

# The committed synthetic default pins what changes the numbers without changing the speed (backbone, which
# "auto" takes as FER+ where the file is cached or downloadable), never what is fast on one CPU and emulated on
# another: precision stays "auto" (bf16 only where native). Across machines the numbers agree within their CIs.
PINNED := -p backbone synthetic_macro

reproduce: $(STAMP)
	AMANLIB_MAGNET_CHECKPOINT="$${AMANLIB_MAGNET_CHECKPOINT:-$$(test -f $(MAGNET_REF) && echo $(MAGNET_REF))}" \
		$(PY) -m amanlib run-notebooks $(PINNED) $(ARGS)
	$(PY) -m amanlib readme

# The wide synthetic regime (about 0.1-8 px of motion) beside the default, into results/wide (README: the synthetic
# regimes); `amanlib readme` states both regimes' verdicts.
reproduce-wide: $(STAMP)
	AMANLIB_MAGNET_CHECKPOINT="$${AMANLIB_MAGNET_CHECKPOINT:-$$(test -f $(MAGNET_REF) && echo $(MAGNET_REF))}" \
		$(PY) -m amanlib run-notebooks $(PINNED) -p synthetic_regime wide --results results/wide $(ARGS)
	$(PY) -m amanlib readme

# The wide regime magnified by the phase-based method, whose over-magnification wraps the phase and so loses the
# motion, into results/phase (README: the synthetic regimes); `amanlib readme` states its verdict beside the others.
reproduce-phase: $(STAMP)
	AMANLIB_MAGNET_CHECKPOINT="$${AMANLIB_MAGNET_CHECKPOINT:-$$(test -f $(MAGNET_REF) && echo $(MAGNET_REF))}" \
		$(PY) -m amanlib run-notebooks $(PINNED) -p synthetic_regime wide -p magnifier phase --results results/phase $(ARGS)
	$(PY) -m amanlib readme

# AMAN with Lagrangian magnification on the same default (AMAN only), into results/lagrangian; `amanlib readme` states
# its difference from the learning-based default with a paired CI (README: magnifiers against the truth).
reproduce-lagrangian: $(STAMP)
	AMANLIB_MAGNET_CHECKPOINT="$${AMANLIB_MAGNET_CHECKPOINT:-$$(test -f $(MAGNET_REF) && echo $(MAGNET_REF))}" \
		$(PY) -m amanlib run-notebooks $(PINNED) -p magnifier lagrangian -p variants "[AMAN]" --results results/lagrangian $(ARGS)
	$(PY) -m amanlib readme

test: $(STAMP)
	$(PY) -m pytest -ra

test-fast: $(STAMP)
	$(PY) -m pytest -ra -m "not slow"

bench: $(STAMP)
	$(PY) bench/magnify.py
	$(PY) bench/precision.py
	$(PY) bench/train.py
	$(PY) bench/sweep.py --loop-runs 4
	$(PY) bench/side_by_side.py
	$(PY) bench/pretrain.py
	$(PY) bench/flops.py
	$(PY) bench/memory.py
	$(PY) bench/scaleout.py

clean:
	rm -rf $(VENV) results/notebooks results/figures results/bench results/work results/metrics.json results/wide \
		results/phase results/lagrangian results/gpu results/gpu_smoke wheelhouse .gpu_site .pytest_cache
	find . -name __pycache__ -type d -prune -exec rm -rf {} +

# The GPU run (issue 23): `make wheelhouse` downloads here the wheels that the GPU machine's image lacks for the kit
# (CPython 3.12, manylinux x86_64; the image's packages are bench/device_packages.txt) and the magnification checkpoint
# into wheelhouse/ (about 19 MiB, within the 64 MiB that travel with the repo); there, offline, `bash bench/gpu.sh`
# installs them and runs the smoke test, the CUDA checks and the full run. `make gpu-dry-run` runs that same command
# here on the CPU with tiny parameters (outputs in temporary folders; tests/test_gpu_command.py does the same).
wheelhouse: $(STAMP)
	AMANLIB_MAGNET_CHECKPOINT="$${AMANLIB_MAGNET_CHECKPOINT:-$$(test -f $(MAGNET_REF) && echo $(MAGNET_REF))}" \
		$(PY) bench/wheelhouse.py

gpu-dry-run: $(STAMP)
	PYTHON=$(abspath $(PY)) bash bench/gpu.sh --dry-run
