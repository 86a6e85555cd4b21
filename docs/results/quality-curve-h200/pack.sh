# copy the curve branch's code into DEST/.gpu/code (the device runs it from there, not from the checkout it is sent)
set -eu
dest=$1
rm -rf $dest/.gpu/code && mkdir -p $dest/.gpu/code
cd /work/wt-curve
git ls-files -z nectar_export graphs runtime bench | grep -zv '^bench/results/' | tar --null -T - -cf - | tar -xf - -C $dest/.gpu/code
cp /work/curve-scratch/run.sh /work/curve-scratch/stage1.sh $dest/.gpu/code/
du -sh $dest/.gpu/code
