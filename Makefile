# pagellm: set-up and the two main jobs. Every target works on a fresh machine.
PYTHON ?= python3
PIP ?= $(PYTHON) -m pip
PROMPT ?= ROMEO. But soft, what light
PYTEST_ARGS ?=

.PHONY: install demo test fixtures lint bench

# torch first, pinned: this exact version is the local CPU build; any other spec pulls CUDA wheels.
install:
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e ".[test]"

demo: install
	pagellm generate --echo --prompt "$(PROMPT)" --max-tokens 80 --temperature 0.8 --seed 0

fixtures:
	$(PYTHON) tests/fixtures/make_models.py

test: install fixtures
	$(PYTHON) -m pytest -q $(PYTEST_ARGS)

lint:
	ruff check pagellm tests benchmarks scripts

bench: install
	pagellm bench throughput --compare hf
