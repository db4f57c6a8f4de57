# Two commands do everything on a fresh machine with Python 3.11 and pip:
#   make train   create .venv, install, run the quickstart pretraining on synthetic data
#   make test    install what the tests need and run the test suite
#   make bench-torch  the PyTorch-parts reference of the training step (bench/pytorch_reference.py)
#                in its own venv .venv-torch (torch is not a project dependency)
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-stamp
PYTEST_ARGS ?=

# torch==2.13.0 exactly: that is the CPU wheel on local disk; a plain `torch` pulls a CUDA build
# of several GB. BENCH_TORCH_ARGS passes options, e.g. BENCH_TORCH_ARGS='--steps 2 --json x.json'.
TORCH_VENV  := .venv-torch
TORCH_STAMP := $(TORCH_VENV)/.installed-stamp
BENCH_TORCH_ARGS ?=

.PHONY: install train test clean bench-torch tcmalloc

# tcmalloc keeps XLA's large per-step buffers instead of faulting them in again (BENCHMARKS.md);
# the launcher preloads it when present. Installed only where that is possible without asking:
# root on a Debian/Ubuntu machine with apt. Anything else (or NO_APT=1) skips it, never fails.
TCMALLOC_LIB := /usr/lib/$(shell uname -m)-linux-gnu/libtcmalloc_minimal.so.4
tcmalloc:
	@if [ -e $(TCMALLOC_LIB) ] || [ -n "$(NO_APT)" ]; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  apt-get install -y -q libtcmalloc-minimal4 >/dev/null 2>&1 \
	    && echo "installed libtcmalloc-minimal4" || echo "tcmalloc: apt-get failed, skipped"; \
	else echo "tcmalloc: not installed (apt-get install libtcmalloc-minimal4 speeds up CPU runs)"; fi

$(STAMP): pyproject.toml
	-@$(MAKE) -s tcmalloc
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

train: $(STAMP)
	$(PY) launch/tpu_train.py --gin_file=gin_configs/runs/quickstart_cpu.gin

test: $(STAMP)
	$(PY) -m pytest -q -n 2 --dist loadfile $(PYTEST_ARGS)

$(TORCH_STAMP):
	$(PYTHON) -m venv $(TORCH_VENV)
	$(TORCH_VENV)/bin/python -m pip install -q --upgrade pip
	$(TORCH_VENV)/bin/python -m pip install -q torch==2.13.0 transformers
	touch $(TORCH_STAMP)

bench-torch: $(TORCH_STAMP)
	$(TORCH_VENV)/bin/python bench/pytorch_reference.py $(BENCH_TORCH_ARGS)

clean:
	rm -rf $(VENV) $(TORCH_VENV) runs
