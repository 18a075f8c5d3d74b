# `make test` / `make demo` build the virtual environment on first use.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-$(shell cat requirements.txt requirements-dev.txt | sha256sum | cut -c1-16)

.PHONY: venv test test-float-paths demo bench gpu-check clean

venv: $(STAMP)

$(STAMP): requirements.txt requirements-dev.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet -r requirements-dev.txt
	rm -f $(VENV)/.installed-*
	touch $@

# Two pytest-xdist workers, a file at a time (a file's tests share its fixtures: test_pipeline.py one finished
# tiny pipeline), in the order tests/conftest.py gives: the files with slow tests first.
test: $(STAMP)
	$(PY) -m pytest -q -n 2 --dist loadfile --no-loadscope-reorder tests

# The tests marked float_sensitive (what trained networks and float maths compute) under other floating-point
# paths: one and two torch threads, and the instruction sets forced down to SSE4 (torch's kernels, oneDNN, MKL,
# numpy's dispatch). Every variant must pass: a verdict that changes with the CPU is a test that is wrong.
FLOAT_PATHS := "OMP_NUM_THREADS=1" "OMP_NUM_THREADS=2" \
	"OMP_NUM_THREADS=1 ATEN_CPU_CAPABILITY=default ONEDNN_MAX_CPU_ISA=SSE41 MKL_ENABLE_INSTRUCTIONS=SSE4_2 NPY_DISABLE_CPU_FEATURES=X86_V3,X86_V4,AVX512_ICL"
test-float-paths: $(STAMP)
	for paths in $(FLOAT_PATHS); do echo "float paths: $$paths"; \
		env $$paths $(PY) -m pytest -q -n 2 --dist loadfile -m float_sensitive tests || exit 1; done

demo: $(STAMP)
	$(PY) run_pipeline.py --preset demo

bench: $(STAMP)
	for script in $(filter-out benchmarks/gpu_check.py,$(wildcard benchmarks/*.py)); do $(PY) $$script || exit 1; done

# On a GPU node: trains in fp32/bf16/fp16 under torchrun and prints the throughput table; ARGS="--preset quick"
# finishes within 6 minutes on one GPU, ARGS="--preset ci" is the CPU dry run (benchmarks/gpu_check.py).
gpu-check: $(STAMP)
	$(PY) benchmarks/gpu_check.py $(ARGS)

clean:
	rm -rf $(VENV) work_dirs
