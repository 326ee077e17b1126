#!/bin/sh
# AI Task Orchestra as one file: this POSIX shell header, then a gzipped tar of the program
# (PyInstaller's one-folder build). The first start extracts it once into a per-user cache,
# later starts run the extracted copy directly (see docs/install.md):
#
#   ${ORCHESTRA_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/ai-task-orchestra/binary}/@ID@/
#
# Extraction goes to .partial.<pid>/ and is renamed into place only once complete (its last
# member, .complete, is there), so a start killed halfway leaves no half-written copy where a
# later start would run it; the next start removes the partial folder and extracts again.
# Copies of other versions are removed, so one copy per version remains.
# Needs only sh, tail, gzip, tar, mkdir, mv, rm (coreutils or busybox).
ORCHESTRA_ID='@ID@'
ORCHESTRA_OFFSET=@OFFSET@

if [ -n "${ORCHESTRA_CACHE_DIR:-}" ]; then
    root=$ORCHESTRA_CACHE_DIR
elif [ -n "${XDG_CACHE_HOME:-}" ]; then
    root=$XDG_CACHE_HOME/ai-task-orchestra/binary
elif [ -n "${HOME:-}" ]; then
    root=$HOME/.cache/ai-task-orchestra/binary
else
    root=${TMPDIR:-/tmp}/ai-task-orchestra-$(id -u)/binary
fi
dir=$root/$ORCHESTRA_ID

if [ ! -f "$dir/.complete" ]; then
    self=$0
    case $self in */*) ;; *) self=$(command -v -- "$0") ;; esac
    mkdir -p "$root" || exit 1
    # Partial folders of starts that were killed (their process is gone).
    for old in "$root"/.partial.*; do
        [ -d "$old" ] || continue
        kill -0 "${old##*.partial.}" 2>/dev/null || rm -rf "$old"
    done
    partial=$root/.partial.$$
    rm -rf "$partial" && mkdir "$partial" || exit 1
    echo "orchestra: first start of this version: unpacking into $dir" >&2
    tail -c "+$ORCHESTRA_OFFSET" "$self" | gzip -dc | tar -xf - -C "$partial"
    if [ ! -f "$partial/.complete" ]; then
        rm -rf "$partial"
        echo "orchestra: unpacking failed (disk full? a truncated download?)" >&2
        exit 1
    fi
    # One rename. Had another start renamed its copy in first, mv puts this one inside it:
    # removed at once.
    mv "$partial" "$dir" || exit 1
    rm -rf "$dir/.partial.$$"
    # One copy per version: the others go (a service still running from one keeps its
    # open files; only new child processes of it would fail).
    for other in "$root"/orchestra-*; do
        [ "$other" = "$dir" ] || rm -rf "$other"
    done
fi
exec "$dir/orchestra" "$@"
exit 1
