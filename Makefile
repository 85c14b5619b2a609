# Set-up is part of every target: a fresh clone needs only `make demo` or `make test`.
# torch is pinned through constraints.txt (2.13.0): this machine's pip takes the local CPU wheel,
# a GPU machine takes the CUDA build of the same version from PyPI.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
SHARED ?= ../shared

.PHONY: setup test demo lint bench compare

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check -c constraints.txt -e ".[dev]"
	touch $@

test: setup
	OMP_WAIT_POLICY=PASSIVE $(PY) -m pytest -q -n 2 --dist loadfile --durations=15

lint: setup
	$(VENV)/bin/ruff check reallm tests benchmarks train.py

# The main job: compress ../shared/models/stories260K with a preset (phase 1), calibration-aware with GPTQ's error
# feedback on CALIBRATION (the best fast method here: docs/results/pipeline-gptq.md), evaluate the checkpoint and the
# original on TinyStories (context 512), print bits and perplexities. `make demo CALIBRATION=` runs it data-free.
PRESET ?= vq-3bit
CALIBRATION ?= $(SHARED)/data/tinystories_train.txt
CAL_WINDOWS ?= 128
METHOD := $(PRESET)$(if $(CALIBRATION),:gptq)
RUN ?= runs/demo-$(PRESET)$(if $(CALIBRATION),,-data-free)
MODEL ?= $(SHARED)/models/stories260K
EVAL_TEXT ?= $(SHARED)/data/tinystories_valid.txt
CPU := --trainer.accelerator cpu
CAL_ARGS := $(if $(CALIBRATION),--model.init_args.calibration.path $(CALIBRATION) \
    --model.init_args.calibration.windows $(CAL_WINDOWS) --model.init_args.calibration.seq_len 512 \
    --model.init_args.compression.error_feedback gptq)

demo: setup
	@test -d $(MODEL) || { echo "error: $(MODEL) not found (the demo needs ../shared)"; exit 1; }
	rm -rf $(RUN)
	$(PY) train.py fit --config configs/ae.yaml --config configs/methods/$(PRESET).yaml \
	    --model.init_args.model_name_or_path $(MODEL) $(CAL_ARGS) $(CPU) --run_dir $(RUN)/compress
	$(PY) train.py validate --config configs/eval.yaml --model.init_args.checkpoint $(RUN)/compress/reallm \
	    --model.init_args.method $(METHOD) --data.init_args.path $(EVAL_TEXT) --data.init_args.seq_len 512 \
	    $(CPU) --run_dir $(RUN)/eval
	$(PY) train.py validate --config configs/eval.yaml --model.init_args.model_name_or_path $(MODEL) \
	    --data.init_args.path $(EVAL_TEXT) --data.init_args.seq_len 512 $(CPU) --run_dir $(RUN)/original
	$(PY) -m reallm.run.report $(RUN)/original $(RUN)/compress $(RUN)/eval
