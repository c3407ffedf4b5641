# Two commands do everything on a fresh machine: `make chat` and `make test`.
# The venv in .venv is rebuilt only when pyproject.toml (the dependency spec) or
# constraints.txt (the versions the suite passed with) changes. `make lock` re-resolves.

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
CORE   := $(VENV)/.installed-core
DEV    := $(VENV)/.installed-dev
# Every install goes through the lock: the exact versions `make test` last passed with.
LOCK   := constraints.txt
PIP    := $(BIN)/python -m pip install -c $(LOCK)
LOCK_HEADER := \# The versions `make test` passed with, for the core and every extra (pip constraints). Upgrade: make lock

# llama.cpp's AMX kernels crash on CPUs that advertise AMX inside some VMs (this one):
# build without them there. pip caches the built wheel, so this costs ~9 min once.
ifneq ($(shell grep -qw amx_tile /proc/cpuinfo 2>/dev/null && echo amx),)
NO_AMX := -mno-amx-tile -mno-amx-int8 -mno-amx-bf16
export CMAKE_ARGS ?= -DCMAKE_C_FLAGS="$(NO_AMX)" -DCMAKE_CXX_FLAGS="$(NO_AMX)"
endif

# Browser tests drive Debian's chromium with Playwright (never Playwright's own download).
CHROMIUM := /usr/bin/chromium

.PHONY: setup chat ui test bench doctor screenshots clean lock vllm

# The core (llama.cpp, no torch) is all `make chat` needs; `make test` adds the dev extras.
$(CORE): pyproject.toml $(LOCK)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip setuptools wheel
	$(PIP) -e .
	rm -f $(DEV) $(UI)
	touch $@

$(DEV): $(CORE)
	$(PIP) -e '.[dev]'
	touch $@

# Installed as root where apt exists (CI, this machine); elsewhere the browser tests skip and say why.
$(CHROMIUM):
	@if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		apt-get install -y -q chromium >/dev/null || (apt-get update -q >/dev/null && apt-get install -y -q chromium >/dev/null); \
	else echo "note: no $(CHROMIUM) and no root apt-get: the browser tests will be skipped"; fi

setup: $(CORE)
	$(BIN)/localchat setup

chat: setup
	$(BIN)/localchat chat

UI := $(VENV)/.installed-ui

$(UI): $(CORE)
	$(PIP) -e '.[ui]'
	touch $@

ui: $(UI) setup
	$(BIN)/localchat ui --host 127.0.0.1

doctor: setup
	$(BIN)/localchat doctor

test: $(DEV) $(CHROMIUM) setup
	$(BIN)/python -m pytest -q tests

# Re-take the screenshots of each tab in docs/ (the README links them) from a real session.
screenshots: $(DEV) $(CHROMIUM) setup
	$(BIN)/python docs/screenshots.py --out docs

# Every benchmark into bench/results.json, then README.md's benchmark section from it (also when a
# bench failed: the README says so). BENCH_ARGS="--only NAME"; BENCH_QUICK=1 for the smallest settings.
bench: $(DEV) $(CHROMIUM) setup
	$(BIN)/python bench/run_all.py $(BENCH_ARGS); status=$$?; \
		$(BIN)/python bench/readme.py && exit $$status

# vLLM in its own environment (it pins its own torch), for `localchat serve --engine vllm`.
vllm: $(CORE)
	command -v uv >/dev/null || $(BIN)/python -m pip install -q uv
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/localchat setup-vllm

clean:
	rm -rf $(VENV) build *.egg-info

# Upgrade: resolve every extra afresh in a new venv (newest versions pyproject.toml allows),
# write them to the lock, then run the whole suite on them. Commit constraints.txt if it passes.
lock:
	rm -rf .venv-lock && $(PYTHON) -m venv .venv-lock
	.venv-lock/bin/python -m pip install -q --upgrade pip setuptools wheel
	.venv-lock/bin/python -m pip install -e '.[all,dev]'
	{ echo '$(LOCK_HEADER)'; .venv-lock/bin/python -m pip freeze --exclude-editable | grep -v '^-e '; } > $(LOCK).new
	mv $(LOCK).new $(LOCK) && rm -rf .venv-lock
	$(MAKE) test
