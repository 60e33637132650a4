#!/usr/bin/env bash
# Install everything a fresh machine lacks, start the services, run the whole test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
./scripts/services.sh
exec .venv/bin/python -m pytest -q -p no:cacheprovider "$@"
