#!/bin/sh
# Removes from a serving virtual environment what serving never loads: the libraries' own test
# suites (pandas/tests, scipy/*/tests, numpy/_core/tests, ...: about 105 MB), pip and setuptools.
# Used by Dockerfile.api; tests/deploy/test_deploy.py serves a bundle (explanations included) from a venv
# slimmed by this same script.
# Usage: deploy/slim_venv.sh VENV
set -eu
venv=${1:?usage: slim_venv.sh VENV}
for site in "$venv"/lib/python3*/site-packages; do
    find "$site" -depth -type d -name tests -path "$site/*/*" -exec rm -rf {} +
done
"$venv/bin/python" -m pip uninstall --yes --quiet pip setuptools
