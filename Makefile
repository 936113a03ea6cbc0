# Two commands do all set-up on a fresh machine: `make demo` and `make test`.
# Both are idempotent: the venv and the install are redone only when pyproject.toml changes.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH_VERSION ?= 2.13.0
EXTRAS ?= dev,onnx
STAMP := $(VENV)/.lowbit-installed

.PHONY: demo test data lint bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# torch is pinned first so that the package's `torch>=2.2` range is already met (a bare `torch` would
# pull a multi-GB CUDA build); override with `make TORCH_VERSION=...` elsewhere.
$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q --disable-pip-version-check "torch==$(TORCH_VERSION)"
	$(BIN)/pip install -q --disable-pip-version-check -e ".[$(EXTRAS)]"
	touch $@

data:
	@bash scripts/ensure-data.sh

demo: $(STAMP) data
	$(BIN)/lowbit demo

test: $(STAMP)
	-@bash scripts/ensure-data.sh
	$(BIN)/python -m pytest

lint: $(STAMP)
	$(BIN)/ruff check src tests bench

clean:
	rm -rf $(VENV) runs
