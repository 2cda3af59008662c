# `make demo` and `make test` do all set-up on a fresh machine (virtualenv, install, run).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# torch 2.14.1 / torchvision 0.29.1 are what this project is tested with; elsewhere pip may pick others.
TORCH_PINS ?= torch==2.14.1 torchvision==0.29.1
OUT ?= demo-out

.PHONY: demo test test-fast sweep bench lint clean mutate mutate-full

# pip -qq: a newcomer sees convscope's own output, not pip's and setuptools' notices (errors still show).
PIP := $(BIN)/pip install -qq

$(BIN)/python:
	@echo "creating $(VENV) and installing convscope (the first time takes a few minutes)"
	@$(PYTHON) -m venv $(VENV)
	@$(PIP) --upgrade pip

$(VENV)/.torch: | $(BIN)/python
	@$(PIP) $(TORCH_PINS) || $(PIP) torch torchvision
	@touch $@

$(VENV)/.installed: pyproject.toml $(VENV)/.torch
	@$(PIP) -e .
	@touch $@

$(VENV)/.dev-installed: pyproject.toml $(VENV)/.installed
	@echo "installing the test dependencies into $(VENV)"
	@$(PIP) -e ".[dev,weights]"
	@# Lucent (bench peer) without its kornia<=0.4.1 pin; pip's resolver notice about it is expected.
	@$(PIP) --no-deps torch-lucent==0.1.8
	@touch $@

demo: $(VENV)/.installed
	@$(BIN)/convscope demo -o $(OUT)
	@$(BIN)/convscope explore $$($(BIN)/python -c "import convscope, pathlib; print(pathlib.Path(convscope.__file__).parent / 'data' / 'chelsea.jpg')") -o $(OUT)/report.html

# The system packages some tests need (chromium, Fashion-MNIST) are installed when this runs as root with
# apt-get; otherwise the run ends with the one command that would install them.
test: $(VENV)/.dev-installed
	@tools/system_deps.sh install
	@$(BIN)/python -m pytest -q -m "not sweep" $(PYTEST_ARGS); status=$$?; tools/system_deps.sh check; exit $$status

# The any-model sweep (tests/test_any_model_sweep.py): every torchvision classifier under 100 M
# parameters and 20 timm families, each method run or refused in one line. CI runs it after `test`.
sweep: $(VENV)/.dev-installed
	$(BIN)/python -m pytest -q -m sweep -p no:cacheprovider $(PYTEST_ARGS)

test-fast: $(VENV)/.dev-installed
	$(BIN)/python -m pytest -q -m "not slow and not peer and not browser and not sweep" $(PYTEST_ARGS)

bench: $(VENV)/.dev-installed
	$(BIN)/python bench/table.py $(BENCH_ARGS)

lint: $(VENV)/.dev-installed
	$(BIN)/ruff check convscope tests bench tools
	$(BIN)/mypy convscope

# Mutation testing of the core numeric modules (not in CI). One mutmut run per module, each
# with only the tests that exercise that module (tools/mutate.py holds the table; a mutant's
# tests run fastest first); prints killed/survived/timeout per module, the names of the
# survivors and (--diffs) their changes. `make mutate`: fixed samples where the tests are slow
# (preprocess and geometry every 2nd mutant, occlusion every 20th), 13 minutes on this
# 2-core machine. `make mutate-full`: every mutant (occlusion every 5th), 26 minutes.
# MODULES narrows either, e.g. make mutate MODULES=gradcam; MUTATE_JOBS=1 leaves one core free.
MODULES ?= predict preprocess geometry relu_rules gradcam patches_merge occlusion
mutate: $(VENV)/.dev-installed
	for module in $(MODULES); do \
	    PYTHONPATH= OMP_NUM_THREADS=1 $(BIN)/python tools/mutate.py $$module --jobs $(or $(MUTATE_JOBS),2) --diffs || exit 1; \
	done

mutate-full: $(VENV)/.dev-installed
	for module in $(MODULES); do \
	    PYTHONPATH= OMP_NUM_THREADS=1 $(BIN)/python tools/mutate.py $$module --full --jobs $(or $(MUTATE_JOBS),2) --diffs || exit 1; \
	done

clean:
	rm -rf $(VENV) $(OUT) .pytest_cache build *.egg-info mutants
