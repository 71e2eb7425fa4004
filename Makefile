# Two commands matter on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# A CPU build of torch by default, so a laptop without CUDA does not pull a multi-GB wheel.
TORCH_SPEC ?= torch==2.13.0

.PHONY: install demo test bench clean

$(BIN)/alloy: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install --quiet "$(TORCH_SPEC)"
	$(BIN)/python -m pip install --quiet -e ".[test]"
	touch $(BIN)/alloy

install: $(BIN)/alloy

demo: install
	$(BIN)/alloy demo

test: install
	$(BIN)/python -m pytest -q

bench: install
	$(BIN)/python -m bench all

clean:
	rm -rf $(VENV) runs build *.egg-info
