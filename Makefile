# Two commands do all set-up on a fresh machine: `make demo` and `make test`.
# Both are idempotent: the venv and the install are redone only when pyproject.toml changes.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH_VERSION ?= 2.13.0
EXTRAS ?= dev,onnx,hf
STAMP := $(VENV)/.lowbit-installed
# A second venv for torchvision models and ImageFolder data (`make test-vision`); `make test` never installs it.
VISION_VENV ?= .venv-vision
VISION_BIN := $(VISION_VENV)/bin
VISION_TORCH_VERSION ?= 2.14.1
TORCHVISION_VERSION ?= 0.29.1
VISION_EXTRAS ?= dev,onnx
VISION_STAMP := $(VISION_VENV)/.lowbit-installed
VISION_TESTS ?= tests/models tests/data tests/quant tests/export

.PHONY: demo test test-vision data lint bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# torch is pinned first so that the package's `torch>=2.2` range is already met (a bare `torch` would
# pull a multi-GB CUDA build); override with `make TORCH_VERSION=...` elsewhere.
$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q --disable-pip-version-check "torch==$(TORCH_VERSION)"
	$(BIN)/pip install -q --disable-pip-version-check -e ".[$(EXTRAS)]"
	touch $@

$(VISION_BIN)/python:
	$(PYTHON) -m venv $(VISION_VENV)

# torch and torchvision are pinned together: each torchvision release builds against one torch release.
$(VISION_STAMP): pyproject.toml | $(VISION_BIN)/python
	$(VISION_BIN)/pip install -q --disable-pip-version-check "torch==$(VISION_TORCH_VERSION)" \
		"torchvision==$(TORCHVISION_VERSION)"
	$(VISION_BIN)/pip install -q --disable-pip-version-check -e ".[$(VISION_EXTRAS)]"
	touch $@

data:
	@bash scripts/ensure-data.sh

demo: $(STAMP) data
	$(BIN)/lowbit demo

test: $(STAMP)
	-@bash scripts/ensure-data.sh
	$(BIN)/python -m pytest

# The tests that skip without torchvision (tv: models, ImageFolder); add timm with VISION_EXTRAS=dev,onnx,timm.
test-vision: $(VISION_STAMP)
	-@bash scripts/ensure-data.sh
	$(VISION_BIN)/python -m pytest $(VISION_TESTS)

lint: $(STAMP)
	$(BIN)/ruff check src tests bench

clean:
	rm -rf $(VENV) $(VISION_VENV) runs
