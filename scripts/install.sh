#!/bin/sh
# Install llamalocal into ./.venv with llama.cpp's RPC backend compiled in (-DGGML_RPC=on: what
# `llamalocal worker` and `--rpc` run on), and make sure it really is there.
#
#   sh scripts/install.sh             # llamalocal
#   sh scripts/install.sh ".[test]"   # with the test extras (what CI runs)
#
# pip reuses a llama-cpp-python wheel it cached from an earlier build whatever CMAKE_ARGS says, so
# an install can silently come without RPC. That is checked after the install; such a wheel is
# removed from pip's cache and llama-cpp-python rebuilt once (a few minutes), and the install fails
# if RPC is still missing. Extra CMAKE_ARGS (a GPU backend) are kept: -DGGML_RPC=on is added to them.
set -eu
cd "$(dirname "$0")/.."
spec="${1:-.}"

case " ${CMAKE_ARGS:-} " in
    *" -DGGML_RPC=on "*) ;;
    *) CMAKE_ARGS="${CMAKE_ARGS:+$CMAKE_ARGS }-DGGML_RPC=on" ;;
esac
export CMAKE_ARGS

python3 -m venv .venv
.venv/bin/pip install -q -e "$spec"

has_rpc() {
    .venv/bin/python -c "import sys, llama_cpp; sys.exit(0 if llama_cpp.llama_supports_rpc() else 1)" 2>/dev/null
}
if ! has_rpc; then
    version=$(.venv/bin/python -c "from importlib.metadata import version; print(version('llama_cpp_python'))")
    echo "llama-cpp-python $version came from a wheel built without RPC (pip's cache); rebuilding it with" \
         "CMAKE_ARGS=\"$CMAKE_ARGS\" (a few minutes)" >&2
    .venv/bin/pip cache remove llama_cpp_python >/dev/null 2>&1 || true
    .venv/bin/pip install -q --force-reinstall --no-deps "llama-cpp-python==$version"
    if ! has_rpc; then
        echo "error: llama-cpp-python $version still has no RPC backend after a rebuild with" \
             "CMAKE_ARGS=\"$CMAKE_ARGS\"; see \`.venv/bin/llamalocal doctor\`" >&2
        exit 1
    fi
fi
