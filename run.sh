#!/usr/bin/env bash
# Run the broker (installs what it needs on first use). Flags go to runbroker:
#   ./run.sh --help
source "$(dirname "$0")/scripts/venv.sh"
exec python manage.py runbroker "$@"
