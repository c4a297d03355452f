#!/usr/bin/env bash
# Create (or reuse) a Python virtualenv holding the pinned python-tuf reference
# implementation used by Tern's interop fixtures and tests.
#
# Usage: interop/setup-venv.sh VENV_DIR
#
# Idempotent: when VENV_DIR already has the pinned packages (checked through a
# stamp file holding the sha256 of requirements.txt, plus an import check) it
# returns immediately without touching the network.
#
# Environment: PYTHON (default python3) selects the interpreter for a new venv.
set -euo pipefail

die() {
    echo "setup-venv.sh: error: $*" >&2
    exit 1
}

if [[ $# -ne 1 || -z "$1" ]]; then
    echo "usage: $0 VENV_DIR" >&2
    exit 2
fi

venv_dir=$1
script_dir=$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")" && pwd)
requirements="$script_dir/requirements.txt"
python=${PYTHON:-python3}
stamp="$venv_dir/.tern-interop-requirements.sha256"

[[ -f "$requirements" ]] || die "requirements file not found: $requirements"
command -v sha256sum >/dev/null || die "sha256sum not found"

want_hash=$(sha256sum "$requirements" | cut -d' ' -f1)
tuf_version=$(sed -n 's/^tuf==\([^[:space:]#]*\).*/\1/p' "$requirements")
[[ -n "$tuf_version" ]] || die "no 'tuf==VERSION' pin in $requirements"

# Succeeds when VENV_DIR's interpreter imports the pinned tuf and the crypto
# backend securesystemslib needs for signing/verification.
venv_imports_ok() {
    [[ -x "$venv_dir/bin/python" ]] &&
        "$venv_dir/bin/python" - "$tuf_version" <<'PY' >/dev/null 2>&1
import sys
import cryptography  # noqa: F401  (needed by securesystemslib's CryptoSigner)
import tuf
sys.exit(0 if tuf.__version__ == sys.argv[1] else 1)
PY
}

# Fast path: already set up from this exact requirements.txt.
if [[ -f "$stamp" && "$(cat "$stamp")" == "$want_hash" ]] && venv_imports_ok; then
    exit 0
fi

if [[ -x "$venv_dir/bin/python" ]] && "$venv_dir/bin/python" -c 'import sys' >/dev/null 2>&1; then
    echo "setup-venv.sh: updating existing venv $venv_dir" >&2
else
    command -v "$python" >/dev/null || die "'$python' not found (set PYTHON=...)"
    if [[ -e "$venv_dir" ]]; then
        # Only ever clear something that is recognisably a (broken) venv or an
        # empty directory: never wipe an arbitrary directory given by mistake.
        if [[ -f "$venv_dir/pyvenv.cfg" ]]; then
            echo "setup-venv.sh: recreating broken venv $venv_dir" >&2
            "$python" -m venv --clear "$venv_dir" || die "'$python -m venv --clear $venv_dir' failed"
        elif [[ -d "$venv_dir" && -z "$(ls -A "$venv_dir")" ]]; then
            "$python" -m venv "$venv_dir" || die "'$python -m venv $venv_dir' failed"
        else
            die "$venv_dir exists but is not a virtualenv; refusing to overwrite it"
        fi
    else
        echo "setup-venv.sh: creating venv $venv_dir" >&2
        mkdir -p "$(dirname -- "$venv_dir")"
        "$python" -m venv "$venv_dir" ||
            die "'$python -m venv $venv_dir' failed (on Debian: apt-get install python3-venv)"
    fi
fi

rm -f "$stamp"
"$venv_dir/bin/python" -m pip install --disable-pip-version-check --no-input -q \
    -r "$requirements" ||
    die "pip install -r $requirements into $venv_dir failed"

venv_imports_ok ||
    die "venv $venv_dir still cannot import tuf==$tuf_version and cryptography after install"

# Write the stamp last and atomically, so an interrupted run is redone.
printf '%s\n' "$want_hash" >"$stamp.tmp"
mv -f "$stamp.tmp" "$stamp"
echo "setup-venv.sh: venv ready: $venv_dir (tuf $tuf_version)" >&2
