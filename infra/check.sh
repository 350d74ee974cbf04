#!/usr/bin/env bash
# Static checks of the Bicep templates, run from the repo root: `bash infra/check.sh`.
#   1. every infra/**/*.bicep parses with pycep (pinned, in .venv-infra/);
#   2. infra/policy.py: our production rules (HTTP concurrency, storage roles on containers and
#      tables only, the private mode's switch and skips);
#   3. checkov's Bicep checks pass (pinned, in its own .venv-checkov/ so its pins never fight the
#      app's) in both network modes, except the checks listed with a reason in
#      infra/checkov-skips.yaml for that mode. checkov evaluates no Bicep `?:` and passes no
#      parameter into a module, so each mode is a copy of infra/ with every
#      `vnetEnabled ? <literal> : <literal>` replaced by that mode's operand (policy.py render).
# Needs only python3 (3.11) with venv and network access to PyPI. Re-runs reuse both venvs.
set -euo pipefail

PYCEP_VERSION="0.7.1"
CHECKOV_VERSION="3.3.30"
INFRA_VENV=".venv-infra"
CHECKOV_VENV=".venv-checkov"
SKIP_FILE="infra/checkov-skips.yaml"

if [[ ! -f infra/main.bicep ]]; then
  echo "run from the repo root: bash infra/check.sh" >&2
  exit 2
fi

# ensure_venv DIR PACKAGE VERSION: create DIR if needed; install PACKAGE==VERSION unless present.
ensure_venv() {
  local dir="$1" package="$2" version="$3"
  if [[ ! -x "$dir/bin/python" ]]; then
    echo "creating $dir"
    python3 -m venv "$dir" || { echo "python3 -m venv failed (Debian: apt-get install python3-venv)" >&2; exit 1; }
  fi
  local installed
  installed="$("$dir/bin/python" -m pip show "$package" 2>/dev/null | sed -n 's/^Version: //p' || true)"
  if [[ "$installed" != "$version" ]]; then
    echo "installing $package==$version into $dir"
    "$dir/bin/python" -m pip install -q --disable-pip-version-check "$package==$version"
  fi
}

# --- 1. parse every Bicep file with pycep --------------------------------------------------------
ensure_venv "$INFRA_VENV" pycep-parser "$PYCEP_VERSION"
mapfile -t BICEP_FILES < <(find infra -name '*.bicep' -type f | sort)
"$INFRA_VENV/bin/python" - "${BICEP_FILES[@]}" <<'PY'
import sys
from pathlib import Path

from pycep import BicepParser

parser = BicepParser()
failed = 0
for name in sys.argv[1:]:
    try:
        tree = parser.parse(file_path=Path(name))
    except Exception as exc:  # pycep raises lark errors of several kinds
        failed += 1
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        print(f"FAIL  {name}: {first_line}")
        continue
    counts = {key: len(tree.get(key) or {}) for key in ("parameters", "resources", "modules", "outputs")}
    print(f"ok    {name}: " + ", ".join(f"{count} {key}" for key, count in counts.items()))
print(f"pycep: {len(sys.argv) - 1 - failed} parsed, {failed} failed")
sys.exit(1 if failed else 0)
PY

# --- 2. our own rules -----------------------------------------------------------------------------
"$INFRA_VENV/bin/python" infra/policy.py

# --- 3. checkov, once per network mode -------------------------------------------------------------
ensure_venv "$CHECKOV_VENV" checkov "$CHECKOV_VERSION"
RENDERED="$(mktemp -d)"
trap 'rm -rf "$RENDERED"' EXIT
for mode in public private; do
  # The skip file holds entries "- id: CKV_..." with a "reason: ..." and optionally
  # "modes: [public]"; a skip without a reason is an error, so every exception stays explained.
  mapfile -t SKIPS < <("$CHECKOV_VENV/bin/python" - "$SKIP_FILE" "$mode" <<'PY'
import sys

import yaml

path, mode = sys.argv[1], sys.argv[2]
with open(path, encoding="utf-8") as handle:
    entries = yaml.safe_load(handle)["skips"]
for entry in entries:
    if not str(entry.get("reason", "")).strip():
        sys.exit(f"{path}: skip {entry.get('id')} has no reason")
    modes = entry.get("modes", ["public", "private"])
    if not set(modes) <= {"public", "private"}:
        sys.exit(f"{path}: skip {entry.get('id')} has unknown modes {modes}")
    if mode in modes:
        print(entry["id"])
PY
  )
  SKIP_ARGS=()
  for check in "${SKIPS[@]}"; do
    SKIP_ARGS+=(--skip-check "$check")
  done
  rm -rf "${RENDERED:?}/$mode" && cp -r infra "$RENDERED/$mode"
  "$INFRA_VENV/bin/python" infra/policy.py render "$RENDERED/$mode" "$mode"
  echo "checkov $CHECKOV_VERSION, $mode mode: skipping ${#SKIPS[@]} check(s) listed in $SKIP_FILE: ${SKIPS[*]:-none}"
  # --compact drops the code blocks; --quiet prints failed checks only, then the summary line.
  "$CHECKOV_VENV/bin/checkov" -d "$RENDERED/$mode" --framework bicep --compact --quiet \
    --skip-download "${SKIP_ARGS[@]}"
done
echo "infra/check.sh: all checks passed"
