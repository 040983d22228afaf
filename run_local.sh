#!/usr/bin/env bash
# ./run_local.sh        set up, ingest the bundled sample corpus, build the index, run a query
# ./run_local.sh test   set up, then run the test suite (extra arguments go to pytest)
set -euo pipefail
cd "$(dirname "$0")"
VENV="${RAGBEAM_VENV:-.venv}"
PYTHON="${PYTHON:-python3}"

setup() {
    [ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
    local stamp="$VENV/.ragbeam-installed" want
    want="$(cat setup.py pyproject.toml | sha256sum | cut -d' ' -f1)"
    if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
        echo "run_local: installing ragbeam and its dependencies into $VENV (first time: a few minutes)"
        "$VENV/bin/python" -m pip install -q --upgrade pip
        "$VENV/bin/python" -m pip install -q -e ".[test]"
        echo "$want" > "$stamp"
    fi
}

setup
case "${1:-sample}" in
    test)
        shift
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
