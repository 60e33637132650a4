#!/usr/bin/env bash
# Install a pinned Label Studio server into its own virtual environment, .venv-label-studio,
# for the review tests (tests/integration/test_label_studio.py): it lives apart from .venv so
# that its pins never constrain difflabel's. Also migrates an empty SQLite database once
# (.venv-label-studio/template/), which the tests copy: a fresh server then starts in about
# 20 s instead of 2 minutes of migrations. Idempotent: a second run only checks the stamp.
# Prints the path of the label-studio executable.
set -euo pipefail
cd "$(dirname "$0")/.."
VERSION=1.23.2
VENV=${DIFFLABEL_LABEL_STUDIO_VENV:-.venv-label-studio}
PY=${PYTHON:-python3}
stamp="$VENV/.label-studio-$VERSION"
if [ ! -f "$stamp" ]; then
  if [ ! -x "$VENV/bin/python" ]; then
    "$PY" -m venv "$VENV"
  fi
  "$VENV/bin/pip" install -q --disable-pip-version-check "label-studio==$VERSION" 2>&1 \
    | grep -v "^WARNING: Location" || true
  rm -rf "$VENV/template"
  # `version` applies the migrations to the data dir's database, then prints the version.
  if ! LABEL_STUDIO_BASE_DATA_DIR="$VENV/template" LATEST_VERSION_CHECK=false COLLECT_ANALYTICS=false \
      "$VENV/bin/label-studio" version --data-dir "$VENV/template" >"$VENV/template.log" 2>&1 \
      || [ ! -f "$VENV/template/label_studio.sqlite3" ]; then
    tail -20 "$VENV/template.log" >&2
    echo "error: Label Studio could not migrate its template database (log: $VENV/template.log)" >&2
    exit 1
  fi
  touch "$stamp"
fi
echo "$VENV/bin/label-studio"
