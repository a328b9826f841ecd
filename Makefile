# jrm-dist: `make demo` (toy end-to-end run), `make test` (the whole suite) and `make test-quick` (unit tests). Each sets up .venv first.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
DEMO_DIR ?= runs/demo

.PHONY: venv aio rehearse-7b test test-quick demo bench clean-demo repro-toy repro-curve

# (Re)install when the venv is missing or setup.py changed. torch==2.13.0 first: it is the CPU wheel on
# these machines and satisfies setup.py's range, so pip does not fetch a multi-GB CUDA build.
$(STAMP): setup.py
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[dev]"
	touch $(STAMP)

venv: $(STAMP)

# DeepSpeed's async-I/O op (parameter offload to disk, `zero.offload_param=nvme`), built once; needs libaio-dev.
aio: $(STAMP)
	$(PY) -c "from deepspeed.ops.op_builder import AsyncIOBuilder as B; assert B().is_compatible(True), 'install libaio-dev'; B().load(verbose=False)"

# The whole suite (what CI runs), with the 20 slowest tests listed at the end.
test: $(STAMP)
	$(PY) -m pytest -q --durations=20

# The edit-test loop: the unit tests, without the tests marked `launch` (whole programs in other processes).
test-quick: $(STAMP)
	$(PY) -m pytest -q -m "not launch" --durations=10

demo: $(STAMP)
	PATH="$(abspath $(VENV))/bin:$$PATH" DEMO_DIR="$(DEMO_DIR)" bash launchers/demo.sh

bench: $(STAMP)
	$(PY) bench/run_all.py

# The JRM effect at toy scale: pretrained tiny backbone, rank-only vs alpha in {0.1, 0.3, 0.5}, 3 seeds each,
# held-out accuracy per group kind, effective rank, calibration; report in runs/repro-toy/report.
repro-toy: $(STAMP)
	PATH="$(abspath $(VENV))/bin:$$PATH" $(PY) -m jrm_dist.repro --config configs/repro_toy.yaml $(REPRO_ARGS)

# Data-efficiency curve (issue 19): alpha 0 vs 0.3, 64..1024 training groups, 3 seeds, 2 runs at a time, each
# single-threaded; report + data_efficiency_curve.png in runs/repro-curve/report. Another replication:
#   make repro-curve REPRO_ARGS="repro.data_seed=10 repro.eval_seed=11 repro.out=runs/repro-curve-rep"
REPRO_CURVE ?= repro.out=runs/repro-curve repro.experiment=repro-curve "repro.alphas=[0.0,0.3]" "repro.seeds=[0,1,2]" \
	"repro.group_sizes=[64,128,256,512,1024]" repro.train_quality_share=0.5 repro.parallel=2
repro-curve: $(STAMP)
	PATH="$(abspath $(VENV))/bin:$$PATH" $(PY) -m jrm_dist.repro --config configs/repro_curve.yaml $(REPRO_CURVE) $(REPRO_ARGS)

# Issue 17's rehearsal: a random Qwen2.5-VL-7B (released layout, real tokenizer) trained through
# `sbatch launchers/train_7b.sh` on the emulated 2-node Slurm cluster (root), requeued and resumed, exported,
# scored, evaluated and served on this CPU machine; ~50 GB of disk in REHEARSE_DIR. Rewrites its section of
# bench/REPORT.md. Not part of `make test`.
REHEARSE_DIR ?= runs/rehearse-7b
rehearse-7b: $(STAMP) aio
	REHEARSE_DIR="$(REHEARSE_DIR)" $(PY) bench/rehearse_7b.py $(REHEARSE_ARGS)

clean-demo:
	rm -rf $(DEMO_DIR)

# GPU acceptance kit (bench/gpu_check.py -> bench/REPORT_GPU.md; on a slot: bash bench/gpu_run.sh) and the wheels
# a bare CUDA image lacks. Neither needs the venv: the GPU machine has its own Python and no registry.
# `make wheelhouse PY=3.12 [PROFILE=kit|suite|full]`: here PY is the *target* Python version (bench/wheelhouse.sh).
.PHONY: gpu-check wheelhouse
PROFILE ?= kit
HOST_PY = $(if $(wildcard $(VENV)/bin/python),$(VENV)/bin/python,python3)

gpu-check:
	$(HOST_PY) bench/gpu_check.py $(GPU_CHECK_ARGS)

wheelhouse:
	PIP="$(HOST_PY) -m pip" bash bench/wheelhouse.sh $(if $(filter 3.%,$(PY)),$(PY),3.12) $(PROFILE)
