# `make demo` and `make test` create .venv themselves. Override any of these on the command
# line, e.g. `make test TORCH_SPEC="torch==2.5.1"` or `make demo PYTHON=python3.12`.
PYTHON ?= python3
VENV ?= .venv
# Installed first, so that pip never pulls a multi-GB CUDA build on a CPU-only machine.
TORCH_SPEC ?= torch==2.13.0
EXTRAS ?= envpool,dev
BIN := $(VENV)/bin
export SDL_VIDEODRIVER ?= dummy

.PHONY: install demo test lint bench clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH_SPEC)"
	$(BIN)/python -m pip install -q -e ".[$(EXTRAS)]"
	touch $@

install: $(VENV)/.installed

# The main job on its defaults: for now, collect a small Doom and CarRacing dataset and
# summarise it (later: the whole quick pipeline).
demo: install
	$(BIN)/wmlab collect --preset doom --profile quick --episodes 24 --workers 2
	$(BIN)/wmlab collect --preset carracing --profile quick --episodes 8 --workers 2
	$(BIN)/wmlab data info runs/doom-quick/data
	$(BIN)/wmlab data info runs/carracing-quick/data

test: install
	$(BIN)/ruff check src tests
	$(BIN)/python -m pytest

lint: install
	$(BIN)/ruff check src tests

bench: install
	$(BIN)/wmlab bench collect

clean:
	rm -rf $(VENV) build dist src/*.egg-info .pytest_cache .ruff_cache
