#!/usr/bin/env bash
# Run every test (installs what it needs on first use). Flags go to pytest.
source "$(dirname "$0")/scripts/venv.sh"
exec python -m pytest "$@"
