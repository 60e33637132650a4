#!/usr/bin/env bash
# Install, then label the 719 held-out digit scans with the bundled demo model
# (in-process: no Redis, no Postgres) and print accuracy and cost.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
.venv/bin/difflabel classify examples/digits/seven/0005.png examples/digits/three/0001.png \
  --labels-file examples/digits/labels.txt --no-progress
exec .venv/bin/difflabel eval examples/digits "$@"
