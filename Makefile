# Two commands from a fresh machine:  make demo  |  make test
# Both create .venv on first use; later runs reuse it and start in seconds.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# Re-install only when the dependency list changes.
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml | sha256sum | cut -c1-12)
HAS_GPU := $(shell nvidia-smi -L >/dev/null 2>&1 && echo 1)

.PHONY: demo test bench venv tritonserver clean

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

test: venv tritonserver
	$(PY) -m pytest -q

# Triton Inference Server for the Triton tests: the server binary and Python backend that
# nvidia-pytriton's wheel carries (Linux x86_64), its stub for this Python, and numpy<2 for the
# stub, which was built against numpy 1 (serve/triton.py: check_numpy_abi). Nothing imports pytriton.
TRITON := $(VENV)/tritonserver
# Touched once tried, with or without success: a machine without it does not retry on every run.
TRITON_STAMP := $(VENV)/.tritonserver-pytriton-0.7.0

tritonserver: $(TRITON_STAMP)

$(TRITON_STAMP): $(STAMP)
	@rm -rf $(TRITON)
	@if $(PY) -m pip install -q --no-deps --target $(TRITON)/server nvidia-pytriton==0.7.0 \
	    && $(PY) -m pip install -q --no-deps --target $(TRITON)/numpy1 "numpy>=1.26,<2"; then \
	  backend=$(TRITON)/server/pytriton/tritonserver; \
	  cp "$$backend/python_backend_stubs/$$($(PY) -c 'import sys; print("%d.%d" % sys.version_info[:2])')/triton_python_backend_stub" \
	     "$$backend/backends/python/" \
	  && ! ldd "$$backend/bin/tritonserver" "$$backend/backends/python/triton_python_backend_stub" | grep "not found" \
	  || { rm -rf $(TRITON); echo "diffrt: this Triton build does not run here (libraries above not found); the Triton tests will skip"; }; \
	else rm -rf $(TRITON); echo "diffrt: could not install Triton Inference Server (pip's error above); the Triton tests will skip"; fi
	@touch $@

bench: venv
	$(VENV)/bin/diffrt bench

clean:
	rm -rf $(VENV) .pytest_cache
