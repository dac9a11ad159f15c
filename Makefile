# Two commands on a fresh machine: `make demo` and `make test`. Both install what they need.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
UV     := $(VENV)/bin/uv
STAMP  := $(VENV)/.fastad-installed

.PHONY: install demo test test-slow bottle bottle-deploy bottle-cpu-line cpp clean

install: $(STAMP)

# uv resolves from PyPI directly, which skips the machine's local CPU-only torch wheel that breaks
# PyPI's torchvision (see requirements.txt).
# setup.py also compiles the C++ post-processing module fastad._postprocess (csrc/) into fastad/;
# without a C++ compiler it warns and fastad.postprocess runs its numpy/scipy path.
$(STAMP): requirements.txt setup.py pyproject.toml $(wildcard csrc/*.cpp csrc/fastad/*.hpp)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check uv
	$(UV) pip install -q --python $(PY) -r requirements.txt
	$(UV) pip install -q --python $(PY) --no-deps -e .
	$(PY) -c "import torch, torchvision, timm; print('fastad install ok: torch', torch.__version__, 'torchvision', torchvision.__version__, 'timm', timm.__version__)"
	$(PY) -c "import fastad.postprocess as p; print('fastad post-processing backend:', p.BACKEND)"
	touch $(STAMP)

demo: install
	$(VENV)/bin/fastad demo --out demo_out

# Bytecode caching on (some machines set PYTHONDONTWRITEBYTECODE): the tests start many fresh
# Python processes (CLI, kill/resume, distributed, serving), each importing torch.
test: install
	env -u PYTHONDONTWRITEBYTECODE $(PY) -m pytest -q tests

# Long real-data runs (MVTec bottle), not part of `make test`.
test-slow: install
	env -u PYTHONDONTWRITEBYTECODE $(PY) -m pytest -q -m slow tests

# The real-data check of issue 2 (MVTec AD bottle, default settings); ~20 min on a 2-core CPU.
BOTTLE ?= ../shared/data/mvtec_ad/bottle
bottle: install
	$(VENV)/bin/fastad train --model fod --data $(BOTTLE) --out runs/bottle --overwrite
	$(VENV)/bin/fastad eval --run runs/bottle --data $(BOTTLE) --report runs/bottle/report.json --overlays runs/bottle/overlays

# C++ library, example program (and the Python module when .venv has pybind11) into build/, then
# the example. Extra CMake options via CMAKE_ARGS, e.g. CMAKE_ARGS=-DFASTAD_WITH_TENSORRT=ON.
cpp:
	cmake -S . -B build $(if $(shell command -v ninja),-G Ninja) \
		$(if $(wildcard $(PY)),-DPython_EXECUTABLE=$(CURDIR)/$(PY)) $(CMAKE_ARGS)
	cmake --build build
	./build/fastad_postprocess_example

# Export the bottle run, check ONNX parity on the whole test set, benchmark torch vs onnxruntime.
bottle-deploy: install
	$(VENV)/bin/fastad export --run runs/bottle --format onnx --out runs/bottle-export/bottle.onnx
	$(VENV)/bin/fastad export --run runs/bottle --format onnx --out runs/bottle-export/bottle16.onnx --fp16
	$(PY) bench/parity.py --run runs/bottle --data $(BOTTLE) --model runs/bottle-export/bottle.onnx \
		--model runs/bottle-export/bottle16.onnx --json bench/results/onnx_parity_bottle_cpu.json
	$(VENV)/bin/fastad bench --run runs/bottle --backend torch,torch-lean,onnx --batch 1,8 --rounds 5 \
		--onnx runs/bottle-export/bottle.onnx --json bench/results/runtime_cpu.json \
		--md bench/results/runtime_cpu.md --png bench/results/runtime_cpu.png

# CPU production lines (issue 19): the run as fp32 and int8 ONNX and fp32 (run at fp32 and bf16) and
# int8 OpenVINO IR, then one `fastad bench` at batch 8 over every backend, with each one's image
# AUROC on the test set and the machine's matrix-product rate measured in the same run.
RUN ?= runs/bottle
CPU_LINE = $(RUN)-cpu-line
bottle-cpu-line: install
	$(VENV)/bin/fastad export --run $(RUN) --format onnx --out $(CPU_LINE)/fp32.onnx
	$(VENV)/bin/fastad export --run $(RUN) --format onnx --out $(CPU_LINE)/int8.onnx --int8 --calibration $(BOTTLE)/train/good
	$(VENV)/bin/fastad export --run $(RUN) --format openvino --out $(CPU_LINE)/fp32.xml
	$(VENV)/bin/fastad export --run $(RUN) --format openvino --out $(CPU_LINE)/int8.xml --int8 --calibration $(BOTTLE)/train/good
	$(VENV)/bin/fastad bench --run $(RUN) --device cpu --batch 8 --rounds 5 --matmul-size 2048 \
		--backend torch,torch:bf16,onnx,onnx:int8,openvino,openvino:bf16,openvino:int8,openvino:int8+bf16 \
		--onnx $(CPU_LINE)/fp32.onnx,$(CPU_LINE)/int8.onnx --openvino $(CPU_LINE)/fp32.xml,$(CPU_LINE)/int8.xml \
		--data $(BOTTLE) --test-set --json bench/results/cpu_line_bottle.json --md bench/results/cpu_line_bottle.md

clean:
	rm -rf $(VENV) demo_out .pytest_cache build fastad/_postprocess*.so
