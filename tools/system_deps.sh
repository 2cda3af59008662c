#!/usr/bin/env bash
# System packages the test suite needs beyond pip: Debian's chromium (browser tests of the web app)
# and dataset-fashion-mnist (training tests). `make test` runs this first.
#   tools/system_deps.sh install   as root with apt-get: install what is missing (quietly)
#   tools/system_deps.sh check     print the one command that installs what is still missing
set -uo pipefail
missing=()
[ -x /usr/bin/chromium ] || missing+=(chromium)
[ -d /usr/share/datasets/fashion-mnist ] || missing+=(dataset-fashion-mnist)
[ ${#missing[@]} -eq 0 ] && exit 0
case "${1:-check}" in
  install)
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
      echo "installing system packages for the tests: ${missing[*]}" >&2
      export DEBIAN_FRONTEND=noninteractive
      apt-get update -qq >/dev/null 2>&1 || true
      apt-get install -y -qq "${missing[@]}" >/dev/null 2>&1 \
        || echo "warning: apt-get could not install ${missing[*]}" >&2
    fi ;;
  check)
    echo "note: $((${#missing[@]})) system package(s) missing, so some tests were skipped: ${missing[*]}" >&2
    echo "note: install them with: sudo apt-get install -y ${missing[*]}   (then run make test again)" >&2 ;;
esac
exit 0
