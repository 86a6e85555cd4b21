# call 2 (and a resumed call 3) on the device: assemble the model, then every curve point as its own process on
# the one GPU; each writes its JSON under /tmp/cv/res, and all of it comes back as one archive in $OUT.
# usage: bash .gpu/code/run.sh SECONDS POINT...   (POINT = context:budget:salient[:family]; DEVICE and EXTRA for a
# rehearsal)
set -u
start=$(date +%s); limit=$1; shift
R=$PWD; C=$R/.gpu/code; T=/tmp/cv; M=$T/stage/SmolLM2-135M-Instruct.Q4_1.gguf
[ -f $T/stage/part.aa ] || { echo "half a is gone: the machine was given back"; exit 3; }
if [ ! -f $M ]; then
  cat $T/stage/part.aa $R/.gpu/b/part.ab > $M
  echo "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53  $M" | sha256sum -c - || exit 4
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target $T/site $T/stage/gguf-0.19.0-py3-none-any.whl || exit 5
fi
mkdir -p $T/shim $T/res $T/curve
ln -sfn $C/nectar_export $T/shim/nectar_export; ln -sfn $C/graphs $T/shim/nectar_graphs; ln -sfn $C/runtime $T/shim/nectar_runtime
export PYTHONPATH=$T/shim:$T/site NECTAR_CACHE=$T/nc TQDM_DISABLE=1 HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 OMP_NUM_THREADS=1
python3 -c "from nectar_export.models import load_model; m = load_model('$M'); print('model', m.fingerprint[:12])" 2>&1 | tail -2
left=$(( limit - ($(date +%s) - start) - 25 ))
echo "staged in $(( $(date +%s) - start )) s; points get $left s"
for point in "$@"; do
  IFS=: read -r ctx budget share family <<<"$point"
  family=${family:-mlp}; name=$ctx-b$budget-s$share; [ $family = mlp ] || name=$name-$family
  [ -f $T/res/$name/done ] && { echo "$name: done before"; continue; }
  ( timeout -k 5 $left python3 $C/bench/quality_curve.py --model $M --context $ctx --qa $ctx --device ${DEVICE:-cuda} \
      --budgets $budget --salient $share --family $family ${EXTRA:-} --work $T/curve/$ctx-$family --out $T/res/$name > $T/res/$name.log 2>&1
    rc=$?; [ $rc = 0 ] && touch $T/res/$name/done; echo "$name: rc $rc at $(( $(date +%s) - start )) s" ) &
done
sleep 60; nvidia-smi --query-gpu=utilization.gpu,memory.used --format=csv,noheader 2>/dev/null; uptime
wait
grep -h '"fit_seconds"' $T/res/*.log | cut -c1-300
tar czf $OUT/res.tgz -C $T res $(cd $T && ls curve/*/*/nectar.json 2>/dev/null)
ls $T/curve/*/
