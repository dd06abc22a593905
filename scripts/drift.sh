#!/usr/bin/env bash
# Drift, seen before a fresh machine sees it: install what pyproject.toml's ranges allow into a
# throwaway venv (never .venv), run the Python suite there with the project's warning filter
# (a transformers deprecation from our calls fails a test), and report which versions differ from
# constraints.txt and what broke. Not part of CI.
#
#   bash scripts/drift.sh            newest releases the ranges allow (no pre-release but the one
#                                    named in pyproject); writes nothing
#   bash scripts/drift.sh --lock     the same, and on a green suite rewrites constraints.txt from it
#                                    (the refresh: commit it as its own reviewed change)
#   bash scripts/drift.sh --lowest   every direct dependency at the floor of its range (torch too,
#                                    from the registry); PYTHON=<a Python 3.10> for the lowest Python
#   ... -- PYTEST_ARGS               run only these tests (e.g. -- tests/test_engine.py)
#
# TORCH_SPEC picks torch as in scripts/setup.sh (default torch==2.13.0, the CPU build); torch is
# never in constraints.txt. DRIFT_DIR keeps the venv and logs there instead of a temporary folder.
set -euo pipefail
cd "$(dirname "$0")/.."
root="$(pwd)"
mode=newest
pytest_args=()
while [ $# -gt 0 ]; do
  case "$1" in
    --lock) mode=lock ;;
    --lowest) mode=lowest ;;
    --) shift; pytest_args=("$@"); break ;;
    *) echo "usage: scripts/drift.sh [--lock | --lowest] [-- PYTEST_ARGS]" >&2; exit 2 ;;
  esac
  shift
done
if [ "$mode" = lock ] && [ ${#pytest_args[@]} -gt 0 ]; then
  echo "drift: --lock runs the whole suite (a lock is what the whole suite passed on)" >&2
  exit 2
fi
PYTHON="${PYTHON:-python3}"
LOCK="$root/constraints.txt"
if [ -n "${DRIFT_DIR:-}" ]; then
  work="$DRIFT_DIR"; mkdir -p "$work"
else
  work="$(mktemp -d /tmp/hirope-drift.XXXXXX)"; trap 'rm -rf "$work"' EXIT
fi
venv="$work/venv"
rm -rf "$venv"
echo "drift: $mode set, $("$PYTHON" --version 2>&1), venv $venv"
"$PYTHON" -m venv "$venv"
py="$venv/bin/python"
"$py" -m pip install --quiet --upgrade pip > "$work/pip.log" 2>&1 || { cat "$work/pip.log"; exit 1; }

# the floor of every direct dependency in pyproject.toml (runtime and [dev]) as name==version
floors() {
  python3 - "$root/pyproject.toml" <<'EOF'
import re, sys, tomllib
project = tomllib.load(open(sys.argv[1], "rb"))["project"]
reqs = project["dependencies"] + project["optional-dependencies"]["dev"]
for req in reqs:
    m = re.match(r"^\s*([A-Za-z0-9._-]+)\s*([^;]*)", req)
    name, spec = m.group(1), m.group(2)
    low = re.search(r"(?:>=|==|~=)\s*([0-9][^,\s]*)", spec)
    if not low:
        sys.exit(f"drift: {req!r} has no floor (>=, == or ~=) in pyproject.toml")
    print(f"{name}=={low.group(1)}")
EOF
}

install_log="$work/install.log"
if [ "$mode" = lowest ]; then
  floors > "$work/floors.txt"
  echo "drift: floors: $(tr '\n' ' ' < "$work/floors.txt")"
  torch_spec="$(grep -i '^torch==' "$work/floors.txt")"
  if [ -n "${TORCH_SPEC:-}" ]; then  # another torch build: its floor is not the one tested
    torch_spec="$TORCH_SPEC"; sed -i '/^torch==/Id' "$work/floors.txt"
  fi
  "$py" -m pip install --quiet "$torch_spec" > "$install_log" 2>&1 || { cat "$install_log"; exit 1; }
  "$py" -m pip install --quiet -c "$work/floors.txt" -e '.[dev]' >> "$install_log" 2>&1 || { cat "$install_log"; exit 1; }
else
  "$py" -m pip install --quiet "${TORCH_SPEC:-torch==2.13.0}" > "$install_log" 2>&1 || { cat "$install_log"; exit 1; }
  "$py" -m pip install --quiet -e '.[dev]' >> "$install_log" 2>&1 || { cat "$install_log"; exit 1; }
fi
"$py" -m pip freeze --all --exclude-editable > "$work/freeze.txt"

echo
echo "== versions: this set against constraints.txt (torch from TORCH_SPEC, not locked)"
"$py" - "$LOCK" "$work/freeze.txt" "$root/pyproject.toml" <<'EOF'
import re, sys
from importlib.metadata import version
from packaging.utils import canonicalize_name
from packaging.version import Version

def pins(path):
    out = {}
    try:
        lines = open(path).read().splitlines()
    except FileNotFoundError:
        return out
    for line in lines:
        line = line.split("#", 1)[0].strip()
        if "==" in line:
            name, ver = line.split("==", 1)
            out[canonicalize_name(name)] = ver.strip()
    return out

lock, now = pins(sys.argv[1]), pins(sys.argv[2])
print(f"  torch {version('torch')}")
now.pop("torch", None)
changed = [(n, lock[n], now[n]) for n in sorted(lock.keys() & now.keys()) if lock[n] != now[n]]
added = [(n, now[n]) for n in sorted(now.keys() - lock.keys())]
removed = [(n, lock[n]) for n in sorted(lock.keys() - now.keys())]
pre = [(n, v) for n, v in sorted(now.items()) if Version(v).is_prerelease]
for n, a, b in changed:
    print(f"  {n}: {a} -> {b}{'  (pre-release)' if Version(b).is_prerelease else ''}")
for n, v in added:
    print(f"  {n}: not locked -> {v}")
for n, v in removed:
    print(f"  {n}: {v} -> not installed")
if not (changed or added or removed):
    print(f"  none: all {len(now)} packages as locked")
else:
    print(f"  {len(changed)} changed, {len(added)} added, {len(removed)} gone, {len(now) - len(changed) - len(added)} as locked")
named = open(sys.argv[3]).read()  # a pre-release pyproject asks for by its version is expected
print("  pre-releases: " + (", ".join(f"{n} {v} ({'named in pyproject' if v in named else 'NOT asked for'})"
                                      for n, v in pre) if pre else "none"))
EOF

echo
echo "== the suite in this set (warnings from transformers' deprecations are errors: pyproject.toml)"
log="$work/pytest.log"
set +e
(cd "$root" && "$py" -m pytest -q -p no:cacheprovider -rfE "${pytest_args[@]}") > "$log" 2>&1
status=$?
set -e
# what broke: pytest's short summary (failures and errors), or its last line when all passed
if grep -q "short test summary info" "$log"; then
  sed -n '/short test summary info/,$p' "$log" | cut -c1-400
else
  tail -n 1 "$log"
fi
deprecations="$(grep -c "is deprecated" "$log" || true)"
echo "  lines in the log that say 'is deprecated': $deprecations"
if [ -n "${DRIFT_DIR:-}" ]; then
  echo "  (full log: $log; freeze: $work/freeze.txt)"
fi

if [ "$mode" = lock ]; then
  if [ "$status" -ne 0 ]; then
    echo "drift: the suite failed in the newest set: constraints.txt left as it was" >&2
    exit "$status"
  fi
  {
    echo "# The tested set: the exact versions the suite passed on, for scripts/setup.sh (pip -c) and so CI."
    echo "# Written by 'bash scripts/drift.sh --lock' ($("$py" --version), $(uname -m), torch $("$py" -c 'import torch; print(torch.__version__)')"
    echo "# from TORCH_SPEC, not locked here); review and commit a refresh as its own change."
    echo "# pyproject.toml keeps the ranges the package supports; this file is not its metadata."
    grep -v -i -E '^(torch)==' "$work/freeze.txt"
  } > "$LOCK"
  echo "drift: constraints.txt rewritten ($(grep -c '==' "$LOCK") pins); review it with git diff"
fi
exit "$status"
