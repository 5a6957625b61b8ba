# flowsuite: `make demo` and `make test` do all set-up on a fresh Debian machine.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
SYSLIBS := libusb-1.0-0 libgl1 libegl1 libxrender1

.PHONY: install demo test test-all lint bench gpu-check clean syslibs

install: $(STAMP)

# System libraries that open3d and RDKit's drawing load at import time.
syslibs:
	@missing=""; for p in $(SYSLIBS); do \
	  dpkg-query -W -f='$${Status}' $$p 2>/dev/null | grep -q "ok installed" || missing="$$missing $$p"; \
	done; \
	if [ -z "$$missing" ]; then exit 0; fi; \
	if ! command -v apt-get >/dev/null 2>&1; then \
	  echo "flowsuite: please install the system libraries:$$missing (open3d and RDKit drawing need them)"; exit 0; fi; \
	if [ "$$(id -u)" = 0 ]; then SUDO=""; elif command -v sudo >/dev/null && sudo -n true 2>/dev/null; then SUDO="sudo -n"; \
	else echo "flowsuite: not root; run: sudo apt-get install -y$$missing"; exit 0; fi; \
	echo "flowsuite: installing system libraries:$$missing"; \
	$$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq --no-install-recommends $$missing >/dev/null \
	  || echo "flowsuite: apt-get failed; install$$missing yourself"

$(STAMP): pyproject.toml
	@$(MAKE) --no-print-directory syslibs
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first, pinned, so that nothing below can pull a CUDA build.
	$(PY) -m pip install -q "torch==2.13.*"
	$(PY) -m pip install -q -e ".[dev]" "torch==2.13.*"
	@touch $(STAMP)

demo: install
	$(PY) -m apps.pointflow train

test: install
	$(PY) -m pytest -q

test-all: install
	$(PY) -m pytest -q -m ""

lint: install
	$(PY) -m ruff check core apps tests scripts

bench: install
	$(PY) -m pip install -q ".[bench]" "torch==2.13.*"
	$(PY) -m scripts.bench_core

# Every GPU path in one unattended run (< 8 min on one H100-class GPU); report in outputs/gpu_check/<time>/.
gpu-check: install
	$(PY) -m scripts.gpu_check

clean:
	rm -rf $(VENV) outputs multirun
