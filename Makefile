# `make demo` and `make test` do all their set-up from a fresh clone.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
SHARED_TRACE := ../shared/data/traces/mixtral-8x7b-instruct.gsm8k.jsonl
SYNTHETIC_TRACE := build/synthetic-trace.jsonl

.PHONY: demo replay-demo test native-test sanitize lint types python-test wheel-check install clean

$(VENV)/.deps-installed: pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	# torch: the pinned CPU wheel where torch is missing (an unpinned torch pulls a multi-GB CUDA build).
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q numpy pybind11 tqdm pytest hypothesis ninja cmake setuptools wheel \
		'transformers>=5.17,<6' safetensors tokenizers accelerate matplotlib ruff mypy fastapi uvicorn openai
	touch $@

install: $(VENV)/.deps-installed
	$(PY) -m pip install -q --no-build-isolation --no-deps -e .

demo: install
	$(VENV)/bin/expertflow generate --expert-slots 25% --prompt "ROMEO:" --max-new-tokens 48
	$(VENV)/bin/expertflow bench --expert-slots 25% --prompt "The json module" --max-new-tokens 48

replay-demo: install
	@if [ -f $(SHARED_TRACE) ]; then \
		trace=$(SHARED_TRACE); \
	else \
		echo "../shared/data is absent: replaying a synthetic trace made by 'expertflow synth-trace' instead"; \
		$(VENV)/bin/expertflow synth-trace --out $(SYNTHETIC_TRACE); \
		trace=$(SYNTHETIC_TRACE); \
	fi; \
	$(VENV)/bin/expertflow replay --trace $$trace --capacity 10%,25%,50% --policy lru,lfu,belady,expertflow --predictor history,oracle

native-test: $(VENV)/.deps-installed
	$(VENV)/bin/cmake -S . -B build/native -G Ninja -DCMAKE_MAKE_PROGRAM=$(abspath $(VENV))/bin/ninja \
		-DEXPERTFLOW_BUILD_PYTHON=OFF -DEXPERTFLOW_BUILD_TESTS=ON > /dev/null
	$(VENV)/bin/cmake --build build/native
	$(VENV)/bin/ctest --test-dir build/native --output-on-failure

# The native tests under AddressSanitizer (with LeakSanitizer) and UBSan; the first report fails the run.
# Host backend only (EXPERTFLOW_WITH_CUDA=OFF): the native tests never touch the CUDA backend. Without a
# driver, cudart_static under ASan only fails cleanly; with one, the driver maps memory into ASan's shadow
# gap and fails to initialise (google/sanitizers#629). scripts/gpu_sanitize.sh checks the CUDA side.
# detect_stack_use_after_return: copies run on worker threads, from buffers a caller may have returned from.
sanitize: $(VENV)/.deps-installed
	$(VENV)/bin/cmake -S . -B build/sanitize -G Ninja -DCMAKE_MAKE_PROGRAM=$(abspath $(VENV))/bin/ninja \
		-DCMAKE_BUILD_TYPE=Debug -DEXPERTFLOW_WITH_CUDA=OFF -DEXPERTFLOW_BUILD_PYTHON=OFF \
		-DEXPERTFLOW_BUILD_TESTS=ON -DEXPERTFLOW_SANITIZE=ON > /dev/null
	$(VENV)/bin/cmake --build build/sanitize
	ASAN_OPTIONS=detect_leaks=1:abort_on_error=1:detect_stack_use_after_return=1 \
		UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1 \
		$(VENV)/bin/ctest --test-dir build/sanitize --output-on-failure

# Lint and types (settings in pyproject.toml): the package ships py.typed, so its annotations must hold.
lint: $(VENV)/.deps-installed
	$(VENV)/bin/ruff check

types: install
	$(VENV)/bin/mypy python/expertflow

python-test: install
	$(PY) -m pytest -q tests

# The wheel, installed into a fresh virtual environment, runs the CLI with its defaults (the bundled
# model, predictor and prompts must be in it).
WHEEL_DIR := build/wheel-check
wheel-check: $(VENV)/.deps-installed
	rm -rf $(WHEEL_DIR)
	$(PY) -m pip wheel -q --no-build-isolation --no-deps -w $(WHEEL_DIR)/dist .
	$(PYTHON) -m venv $(WHEEL_DIR)/venv
	$(WHEEL_DIR)/venv/bin/python -m pip install -q torch==2.13.0
	$(WHEEL_DIR)/venv/bin/python -m pip install -q $(WHEEL_DIR)/dist/expertflow-*.whl
	cd $(WHEEL_DIR) && venv/bin/expertflow generate --prompt "ROMEO:" --max-new-tokens 8

test: lint types native-test sanitize python-test wheel-check

clean:
	rm -rf build python/expertflow/_C*.so
