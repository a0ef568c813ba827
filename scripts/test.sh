#!/usr/bin/env bash
# Install everything the tests need (Debian peers + Python test extra) and run the whole suite.
# Usage: bash scripts/test.sh [pytest args...]      (the README's test command; .ci/run calls it)
set -euo pipefail
cd "$(dirname "$0")/.."

# Real peers the tests talk to: Orthanc (PACS), dcmtk (storescu/echoscu/dcmj2pnm), dicom3tools (dciodvfy).
need=()
command -v Orthanc >/dev/null 2>&1 || [ -x /usr/sbin/Orthanc ] || need+=(orthanc)
command -v storescu >/dev/null 2>&1 || need+=(dcmtk)
command -v dciodvfy >/dev/null 2>&1 || need+=(dicom3tools)
# PixelMed's SR validator (its DicomSRValidator wrapper; the tests run the jar with a JRE it pulls in).
command -v DicomSRValidator >/dev/null 2>&1 || need+=(pixelmed-apps)
# PostgreSQL's server (initdb, pg_ctl): the storage tests start a throw-away cluster on a free port.
ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || command -v initdb >/dev/null 2>&1 || need+=(postgresql)
# A real headless browser for the audit report test (every embedded figure must load).
command -v chromium >/dev/null 2>&1 || need+=(chromium)
# OpenJPEG for glymur's reduced-resolution JPEG 2000 decoding (without it, images are decoded in full).
ldconfig -p 2>/dev/null | grep -q 'libopenjp2\.so\.7' || need+=(libopenjp2-7)
if [ ${#need[@]} -gt 0 ]; then
  SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  echo "installing Debian packages: ${need[*]}"
  $SUDO apt-get update -q
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q --no-install-recommends "${need[@]}"
  # Debian starts the packaged Orthanc service; the tests run their own instances on free ports.
  $SUDO systemctl stop orthanc >/dev/null 2>&1 || $SUDO service orthanc stop >/dev/null 2>&1 || true
  # Likewise Debian's PostgreSQL cluster on port 5432: the tests run clusters of their own.
  $SUDO systemctl stop postgresql >/dev/null 2>&1 || $SUDO service postgresql stop >/dev/null 2>&1 || true
fi

PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -e '.[test]'
# Lint and types first, as configured in pyproject.toml ([tool.ruff], [tool.mypy]); either failing fails the run.
.venv/bin/ruff check .
.venv/bin/mypy
exec .venv/bin/python -m pytest "$@"
