#!/usr/bin/env bash
# Run the tests (installs what it needs on first use). Flags go to pytest; --heavy adds
# the heavy system tests (see README, "The two commands"); TEST_TIME_FACTOR=3 gives
# every bounded wait three times as long on a slow machine.
source "$(dirname "$0")/scripts/venv.sh"
exec python -m pytest "$@"
