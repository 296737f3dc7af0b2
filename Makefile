# `make demo` and `make test` create .venv themselves. Override any of these on the command
# line, e.g. `make test TORCH_SPEC="torch==2.5.1"` or `make demo PYTHON=python3.12`.
# Without a GPU, take PyTorch's CPU build from its own index (no multi-GB CUDA download):
#   make install TORCH_INDEX=https://download.pytorch.org/whl/cpu
PYTHON ?= python3
VENV ?= .venv
# Installed first, so that wmlab's `torch>=2.4` is already met and pip fetches no other torch.
TORCH_SPEC ?= torch==2.13.0
# Package index for torch alone; empty = pip's default index.
TORCH_INDEX ?=
EXTRAS ?= envpool,dev
BIN := $(VENV)/bin
export SDL_VIDEODRIVER ?= dummy

.PHONY: install demo test lint bench clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX)) "$(TORCH_SPEC)"
	$(BIN)/python -m pip install -q -e ".[$(EXTRAS)]"
	touch $@

install: $(VENV)/.installed

# The main job on its defaults: the whole Doom pipeline at the quick profile (collect, V,
# encode, M, C trained in the dream, evaluation in the real game, report). Re-running
# resumes where it stopped; it ends by printing the path of the report.
demo: install
	$(BIN)/wmlab run --preset doom --profile quick

# The tests in parallel (pytest-xdist: one worker per core, at most 4), then those that start
# Ray on their own: a Ray cluster test reads every cluster on the machine, so none may run
# beside it. Plain `pytest` runs them all in one process.
test: install
	$(BIN)/ruff check src tests
	$(BIN)/python -m pytest -m "not ray" -n auto --maxprocesses 4
	$(BIN)/python -m pytest -m ray

lint: install
	$(BIN)/ruff check src tests

bench: install
	for stage in collect vision memory controller; do $(BIN)/wmlab bench $$stage || exit 1; done

clean:
	rm -rf $(VENV) build dist src/*.egg-info .pytest_cache .ruff_cache
