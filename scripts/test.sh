#!/usr/bin/env bash
# Install everything a fresh machine lacks, start the services, run the whole test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
./scripts/services.sh
# `difflabel serve`'s page is tested in a real browser: Debian's chromium (Playwright drives it;
# its own browser downloads are not used). Installed once; later runs only check.
if [ ! -x /usr/bin/chromium ]; then
  SUDO=""
  [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  echo "installing chromium (apt-get) for tests/integration/test_serve_page.py" >&2
  log=$(mktemp)
  if ! { DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends chromium \
         || { $SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive \
              $SUDO apt-get install -y -qq --no-install-recommends chromium; }; } >"$log" 2>&1; then
    tail -5 "$log" >&2
    echo "error: could not install chromium with apt-get; the serve page test will fail until" \
         "/usr/bin/chromium exists (apt-get install -y --no-install-recommends chromium)" >&2
  fi
  rm -f "$log"
fi
# Label Studio, in its own venv, for the review tests (about 5 minutes the first time, cached)
./scripts/label_studio.sh >/dev/null \
  || echo "warning: Label Studio could not be installed; tests/integration/test_label_studio.py will fail" >&2
exec .venv/bin/python -m pytest -q -p no:cacheprovider "$@"
