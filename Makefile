# Two commands for a fresh machine: `make demo` (the main job) and `make test`. Each makes its own .venv and
# installs the versions in requirements.lock, the set the test suite passed with.
PYTHON ?= python3
VENV   ?= .venv
# torch is installed on its own so that a CUDA or CPU build can be chosen (e.g. TORCH="torch==2.13.0
# --index-url https://download.pytorch.org/whl/cu128"); the lock pins everything else.
TORCH  ?= torch==2.13.0
LOCK   ?= requirements.lock
PY      = $(VENV)/bin/python
STAMP   = $(VENV)/.installed
# torch's own CUDA wheels: pinned by torch itself, so left out of the lock (a CPU build needs none of them).
TORCH_DEPS = torch triton cuda-bindings cuda-pathfinder cuda-toolkit $(shell echo nvidia-{cublas,cuda-cupti,cuda-nvrtc,cuda-runtime,cudnn-cu13,cufft,cufile,curand,cusolver,cusparse,cusparselt-cu13,nccl-cu13,nvjitlink,nvshmem-cu13,nvtx,cuda-cccl})
SHELL := /bin/bash
LOCK_DATE ?= $(shell date -u +%Y-%m-%d)

.PHONY: demo test test-latest test-ipywidgets7 lab lint lock clean

$(STAMP): pyproject.toml $(LOCK)
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH)
	$(PY) -m pip install -q -r $(LOCK)
	$(PY) -m pip install -q --no-deps -e .
	touch $(STAMP)

demo: $(STAMP)  ## compare every method on the embedded default; prints the HTML report's path
	$(PY) -m nbtune.demo

test: $(STAMP)  ## the whole test suite (the browser test needs chromium: apt-get install chromium)
	$(PY) -m ruff check nbtune widgets tests bench
	$(PY) -m pytest -q

test-ipywidgets7: ## the widget tests once more under ipywidgets 7.7 (what Colab ships), in .venv-ipywidgets7
	$(MAKE) VENV=.venv-ipywidgets7 LOCK=requirements-ipywidgets7.lock .venv-ipywidgets7/.installed
	.venv-ipywidgets7/bin/python -m pytest -q tests/test_widgets.py tests/test_notebook_static.py

test-latest: ## the newest release of every dependency, in .venv-latest: upstream drift seen before users see it
	$(PYTHON) -m venv .venv-latest
	.venv-latest/bin/python -m pip install -q --upgrade pip
	.venv-latest/bin/python -m pip install -q --upgrade --upgrade-strategy eager torch -e ".[dev]"
	.venv-latest/bin/python -m pip list 2>/dev/null | grep -iE '^(torch|transformers|peft|accelerate|datasets|ipywidgets|plotly|jupyterlab|notebook) '
	.venv-latest/bin/python -m pytest -q

lab: $(STAMP)  ## the interactive version: JupyterLab on the example notebooks
	$(VENV)/bin/jupyter lab example_notebooks/

lock:  ## refresh both locks from today's releases (needs uv: pip install uv); then run make test
	uv pip compile pyproject.toml --extra dev --universal --custom-compile-command "make lock" --exclude-newer $(LOCK_DATE) \
	  $(addprefix --no-emit-package ,$(TORCH_DEPS)) -c <(echo "$(TORCH)") -o requirements.lock
	uv pip compile pyproject.toml --extra dev --universal --custom-compile-command "make lock" --exclude-newer $(LOCK_DATE) \
	  $(addprefix --no-emit-package ,$(TORCH_DEPS)) -c <(echo "$(TORCH)") \
	  --override <(echo "ipywidgets==7.7.5") -o requirements-ipywidgets7.lock

clean:
	rm -rf $(VENV) .venv-latest .venv-ipywidgets7 .nbtune
