# Sourced by run.sh and test.sh: make .venv and install requirements.txt into it.
# Installs again only when requirements.txt changed, so later starts are instant.
# PYTHON picks the interpreter, VENV the folder (CI builds a second one for Django 6:
# PYTHON=python3.12 VENV=.venv-django6 ./test.sh ...).
set -eu
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PYTHON="${PYTHON:-python3}"
VENV="${VENV:-.venv}"
if ! "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
    echo "error: Python 3.11 or newer is needed (tried '$PYTHON'; set PYTHON=...)" >&2
    exit 1
fi
if [ ! -x "$VENV/bin/python" ]; then
    echo "Creating $VENV ..." >&2
    "$PYTHON" -m venv "$VENV"
fi
stamp="$VENV/.requirements.sha"
want=$(sha256sum requirements.txt | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
    echo "Installing requirements into $VENV ..." >&2
    "$VENV/bin/python" -m pip install --disable-pip-version-check -q -r requirements.txt
    echo "$want" > "$stamp"
fi
VENV="$(cd "$VENV" && pwd)"
export PATH="$VENV/bin:$PATH"
