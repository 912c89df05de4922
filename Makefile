# Two commands for a fresh machine: `make demo` (the main job) and `make test`. Each makes its own .venv.
PYTHON ?= python3
VENV   ?= .venv
TORCH  ?= torch==2.13.0
PY      = $(VENV)/bin/python
STAMP   = $(VENV)/.installed

.PHONY: demo test lab lint clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e ".[dev]"
	touch $(STAMP)

demo: $(STAMP)  ## compare every method on the embedded default; prints the HTML report's path
	$(PY) -m nbtune.demo

test: $(STAMP)  ## the whole test suite (the browser test needs chromium: apt-get install chromium)
	$(PY) -m ruff check nbtune widgets tests bench
	$(PY) -m pytest -q

lab: $(STAMP)  ## the interactive version: JupyterLab on the example notebooks
	$(VENV)/bin/jupyter lab example_notebooks/

clean:
	rm -rf $(VENV) .nbtune
