# Two commands do everything on a fresh machine: `make chat` and `make test`.
# The venv in .venv is rebuilt only when pyproject.toml (the dependency spec) changes.

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
CORE   := $(VENV)/.installed-core
DEV    := $(VENV)/.installed-dev

# llama.cpp's AMX kernels crash on CPUs that advertise AMX inside some VMs (this one):
# build without them there. pip caches the built wheel, so this costs ~9 min once.
ifneq ($(shell grep -qw amx_tile /proc/cpuinfo 2>/dev/null && echo amx),)
NO_AMX := -mno-amx-tile -mno-amx-int8 -mno-amx-bf16
export CMAKE_ARGS ?= -DCMAKE_C_FLAGS="$(NO_AMX)" -DCMAKE_CXX_FLAGS="$(NO_AMX)"
endif

.PHONY: setup chat ui test bench doctor clean

# The core (llama.cpp, no torch) is all `make chat` needs; `make test` adds the dev extras.
$(CORE): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip setuptools wheel
	$(BIN)/python -m pip install -e .
	rm -f $(DEV)
	touch $@

$(DEV): $(CORE)
	$(BIN)/python -m pip install -e '.[dev]'
	touch $@

setup: $(CORE)
	$(BIN)/localchat setup

chat: setup
	$(BIN)/localchat chat

ui: setup
	$(BIN)/localchat ui --host 127.0.0.1

doctor: setup
	$(BIN)/localchat doctor

test: $(DEV) setup
	$(BIN)/python -m pytest -q tests

bench: $(DEV) setup
	$(BIN)/python bench/bench_runtime.py
	$(BIN)/python bench/bench_serve.py

clean:
	rm -rf $(VENV) build *.egg-info
