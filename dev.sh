#!/usr/bin/env bash
# One entry point for set-up + the two jobs the README names:
#   bash dev.sh quickstart [args]   build, train, evaluate, save and reload a tiny model
#   bash dev.sh test [pytest args]  run the test suite
#   bash dev.sh <anything else>     run `mllmseg <anything else>` inside the environment
#   bash dev.sh lock                refresh requirements/lock.txt (the newest releases setup.py's ranges allow)
# It creates (or reuses) .venv next to this file and installs torch, then the exact versions of
# requirements/lock.txt, then this package (editable, no other dependency resolution).
# TORCH_SPEC picks the torch build (default torch==2.13.0, the CPU wheel on this machine);
# TORCH_INDEX_URL adds a wheel index, e.g. https://download.pytorch.org/whl/cu124 for CUDA 12.4.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
venv="${MLLMSEG_VENV:-$here/.venv}"
py="${PYTHON:-python3}"
[ -x "$venv/bin/python" ] || "$py" -m venv "$venv"
stamp="$venv/.mllmseg-installed"
want="$(cat "$here/setup.py" "$here/dev.sh" "$here/requirements/lock.txt" | sha256sum | cut -c1-16)-${TORCH_SPEC:-torch==2.13.0}"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  "$venv/bin/python" -m pip install -q --upgrade pip
  # torch first and pinned: anything else that pulls torch in would fetch a CUDA build.
  "$venv/bin/python" -m pip install -q "${TORCH_SPEC:-torch==2.13.0}" ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"}
  "$venv/bin/python" -m pip install -q -r "$here/requirements/lock.txt"
  "$venv/bin/python" -m pip install -q --no-deps -e "$here"
  echo "$want" > "$stamp"
fi
export HF_HUB_DISABLE_TELEMETRY=1
cmd="${1:-test}"; shift || true
case "$cmd" in
  test) cd "$here" && HF_HUB_OFFLINE=1 exec "$venv/bin/python" -m pytest -q "$@" tests ;;
  lock) exec "$venv/bin/python" "$here/.ci/overlay_env.py" lock "$here/requirements/lock.txt" ;;
  *) exec "$venv/bin/mllmseg" "$cmd" "$@" ;;
esac
