# edgefleet: `make test` and `make demo` work from a clean clone; they create .venv.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp
TRAIN_VENV := .venv-train

.PHONY: help venv check test demo demo-line bench train clean

help:
	@echo "make test   - create .venv, install, run ruff, mypy --strict and pytest"
	@echo "make demo   - create .venv if missing, run broker, fleet server + console and three agents"
	@echo "make demo-line - one synthetic line through the model, no fleet"
	@echo "make bench  - run edge-agent bench on both reference bundles"
	@echo "make train  - retrain the reference model (dev only: torch, tensorflow-cpu)"

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test,tflite,server,postgres,demo,outputs]'
	touch $(STAMP)

venv: $(STAMP)

check: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

test: check
	$(BIN)/pytest -q

demo: $(STAMP)
	$(BIN)/fleet-server demo --model models/reference-onnx

demo-line: $(STAMP)
	$(BIN)/edge-agent demo --model models/reference-onnx

bench: $(STAMP)
	$(BIN)/edge-agent bench --model models/reference-onnx
	$(BIN)/edge-agent bench --model models/reference-tflite

# Training needs torch (CPU build, pinned) and tensorflow-cpu for the int8 conversion;
# neither is ever a runtime dependency, so they live in their own venv.
train:
	$(PYTHON) -m venv $(TRAIN_VENV)
	$(TRAIN_VENV)/bin/python -m pip install --quiet --upgrade pip
	$(TRAIN_VENV)/bin/python -m pip install --quiet -e '.[train,tflite]'
	$(TRAIN_VENV)/bin/python scripts/train_reference.py

clean:
	rm -rf $(VENV) $(TRAIN_VENV) .mypy_cache .ruff_cache .pytest_cache .hypothesis
