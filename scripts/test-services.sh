#!/usr/bin/env bash
# Installs what the test suite runs against when the machine lacks it: PostgreSQL server binaries (the suite starts
# its own throwaway cluster from them), promtool (Debian's prometheus package) and chromium (the UI's browser tests
# drive it through Playwright). Needs root and apt-get; otherwise
# it only reports what is missing.
set -euo pipefail
missing=()
ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || command -v initdb >/dev/null 2>&1 || missing+=(postgresql)
command -v promtool >/dev/null 2>&1 || missing+=(prometheus)  # promtool checks deploy/prometheus.yml
command -v chromium >/dev/null 2>&1 || missing+=(chromium)  # tests/integration/test_ui_browser.py
[ ${#missing[@]} -eq 0 ] && exit 0
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "installing: ${missing[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
else
    echo "missing (install them to run every test): ${missing[*]}" >&2
fi
