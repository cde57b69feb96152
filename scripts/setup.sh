#!/usr/bin/env bash
# Create (once) the project's virtual environment in .venv and install qmis_jax with the extras asked for.
#   bash scripts/setup.sh            # runtime + molecular extra (what the studies need)
#   bash scripts/setup.sh --test     # + test and interop extras (jax-privacy, qwix)
# Idempotent: when .venv already holds an install of the same pyproject.toml and extras, it does nothing.
set -euo pipefail
cd "$(dirname "$0")/.."
extras="molecular"
for arg in "$@"; do
  case "$arg" in
    --test) extras="$extras,test,interop" ;;
    --bench) extras="$extras,bench" ;;
    *) echo "setup.sh: unknown option '$arg' (use --test or --bench)" >&2; exit 2 ;;
  esac
done
py="${PYTHON:-python3}"
if ! "$py" -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
  echo "setup.sh: Python 3.11 or newer is needed ($py is $("$py" --version 2>&1))" >&2; exit 2
fi
[ -x .venv/bin/python ] || "$py" -m venv .venv
stamp=".venv/.qmis-install-$(cat pyproject.toml scripts/setup.sh scripts/constraints.txt | sha1sum | cut -c1-12)-${extras//,/_}"
if [ ! -f "$stamp" ]; then
  .venv/bin/python -m pip install --quiet --upgrade pip
  .venv/bin/python -m pip install --quiet -c scripts/constraints.txt -e ".[$extras]"
  # MoleculeACE's 30 ChEMBL sets are read as files; its declared dependencies would replace RDKit with an old
  # build, so it is installed without them (the package itself is never imported).
  .venv/bin/python -m pip install --quiet --no-deps "moleculeace==3.0.0"
  rm -f .venv/.qmis-install-*
  touch "$stamp"
fi
