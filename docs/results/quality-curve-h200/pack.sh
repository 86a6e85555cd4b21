# copy a checkout's code into DEST/.gpu/code, with the two device scripts beside it (the device runs that copy,
# not the checkout it is sent; .gpu/ must be git-ignored and named in `carry`)
# usage: bash docs/results/quality-curve-h200/pack.sh DEST   (from the checkout whose code should run)
set -eu
dest=$1 here=$(cd "$(dirname "$0")" && pwd)
rm -rf "$dest/.gpu/code" && mkdir -p "$dest/.gpu/code"
git ls-files -z nectar_export graphs runtime bench | grep -zv '^bench/results/' | tar --null -T - -cf - | tar -xf - -C "$dest/.gpu/code"
cp "$here/run.sh" "$here/stage1.sh" "$dest/.gpu/code/"
du -sh "$dest/.gpu/code"
