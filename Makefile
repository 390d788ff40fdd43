# Two entry points: `make demo` and `make test`. Each bootstraps what it needs:
# a venv with pinned dependencies (CPU torch), Xvfb and Qt's xcb libraries when missing.
SHELL := /bin/bash
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
APT_PKGS := xvfb xauth libxkbcommon-x11-0 libxcb-icccm4 libxcb-image0 libxcb-keysyms1 \
	libxcb-randr0 libxcb-render-util0 libxcb-xinerama0 libxcb-xfixes0 libxcb-shape0 \
	libxcb-cursor0 libegl1 libgl1 libgl1-mesa-dri libglx-mesa0 libfontconfig1 libdbus-1-3 \
	libglib2.0-0 libxkbcommon0
# Run headless when there is no display.
XRUN := $(if $(DISPLAY),,xvfb-run -a -s "-screen 0 1600x1000x24")

.PHONY: demo test venv sysdeps bench clean

$(STAMP): pyproject.toml requirements/constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip wheel setuptools
	$(PY) -m pip install -q -c requirements/constraints.txt "torch==2.13.0"
	$(PY) -m pip install -q -c requirements/constraints.txt -e ".[qt,dev]"
	touch $(STAMP)

venv: $(STAMP)

sysdeps:
	@missing=""; for p in $(APT_PKGS); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
		echo "installing system packages:$$missing"; \
		if [ "$$(id -u)" = 0 ]; then SUDO=""; else SUDO="sudo"; fi; \
		$$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq $$missing >/dev/null; \
	fi

demo: venv sysdeps
	$(XRUN) $(PY) -m napari_mupd.demo --out demo-out $(if $(DISPLAY),--interactive,)

test: venv sysdeps
	$(XRUN) $(PY) -m pytest $(PYTEST_ARGS)

bench: venv sysdeps
	for b in benchmarks/bench_*.py; do $(XRUN) $(PY) $$b || exit 1; done

clean:
	rm -rf $(VENV) demo-out .pytest_cache
