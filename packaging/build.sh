#!/bin/sh
# Builds dist/orchestra, the single binary (`make dist` runs this; see docs/install.md):
#   1. PyInstaller, one folder (packaging/orchestra.spec): the service, the CLI, the built-in
#      templates, the dashboard's files, llama.cpp (the installed llama-cpp-python) and SmolLM2;
#   2. that folder as a gzipped tar, ending with a .complete marker;
#   3. packaging/launcher.sh in front of it, naming the version and the payload's hash.
# Usage: packaging/build.sh PYTHON [OUTPUT]
# ORCHESTRA_ONEFILE=1 builds PyInstaller's own --onefile instead (for the measurements in
# benchmarks/RESULTS.md): it unpacks into a temporary folder on every start.
set -eu
python=${1:?usage: packaging/build.sh PYTHON [OUTPUT]}
out=${2:-dist/orchestra}
cd "$(dirname "$0")/.."
work=build/pyinstaller

mkdir -p "$work" "$(dirname "$out")"
if [ -n "${ORCHESTRA_ONEFILE:-}" ]; then
    ORCHESTRA_ONEFILE=1 "$python" -m PyInstaller --noconfirm --log-level WARN \
        --distpath "$work/onefile" --workpath "$work/work-onefile" packaging/orchestra.spec
    cp "$work/onefile/orchestra" "$out"
    exit 0
fi
"$python" -m PyInstaller --noconfirm --log-level WARN \
    --distpath "$work/dist" --workpath "$work/work" packaging/orchestra.spec
folder=$work/dist/orchestra
touch "$folder/.complete"

# .complete last: a start that finds it knows the whole tar was read. Fixed times and owners,
# so the same folder gives the same hash.
payload=$work/payload.tar.gz
(cd "$folder" && find . -path ./.complete -prune -o -print | LC_ALL=C sort |
    tar --no-recursion --owner=0 --group=0 --numeric-owner --mtime=@0 -cf - -T - ./.complete) |
    gzip -6 -n > "$payload"

version=$("$python" -c 'import re, sys; print(re.search(r"__version__ = \"(.+)\"", open("src/orchestra/__init__.py").read())[1])')
hash=$(sha256sum "$payload" | cut -c1-12)
id="orchestra-$version-$hash"

# The header's size depends on the offset it names: pad the offset to a fixed width.
header=$work/header.sh
sed -e "s/@ID@/$id/g" -e "s/@OFFSET@/OFFSETXXXX/" packaging/launcher.sh > "$header"
size=$(wc -c < "$header")
offset=$(printf '%-10s' $((size + 1)))  # trailing spaces end the shell assignment
sed -e "s/@ID@/$id/g" -e "s/@OFFSET@/$offset/" packaging/launcher.sh > "$header"
[ "$(wc -c < "$header")" = "$size" ] || { echo "header size changed" >&2; exit 1; }

cat "$header" "$payload" > "$out.partial"
chmod 755 "$out.partial"
mv "$out.partial" "$out"
echo "built $out ($id, $(du -m "$out" | cut -f1) MB)"
