# Two commands from a fresh machine:  make demo  |  make test
# Both create .venv on first use; later runs reuse it and start in seconds.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# Re-install only when the dependency list changes.
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml | sha256sum | cut -c1-12)
HAS_GPU := $(shell nvidia-smi -L >/dev/null 2>&1 && echo 1)

.PHONY: demo test bench venv clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@$(PY) -m pip install -q --upgrade pip
ifeq ($(HAS_GPU),1)
	@echo "diffrt: nvidia-smi found a GPU: installing the CUDA build of torch and the gpu extra"
	@$(PY) -m pip install -q torch
	@$(PY) -m pip install -q -e ".[gpu,serve,train,test]"
else
	@echo "diffrt: no GPU: installing the CPU build of torch and the cpu extra"
	@# torch==2.13.0 is the CPU wheel here; install it first so nothing pulls a CUDA build.
	@$(PY) -m pip install -q torch==2.13.0
	@$(PY) -m pip install -q -e ".[cpu,serve,train,test]"
endif
	@rm -f $(VENV)/.installed-*
	@touch $(STAMP)

demo: venv
	$(VENV)/bin/diffrt demo

test: venv
	$(PY) -m pytest -q

bench: venv
	$(VENV)/bin/diffrt bench

clean:
	rm -rf $(VENV) .pytest_cache
