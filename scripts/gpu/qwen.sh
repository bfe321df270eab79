#!/usr/bin/env bash
# Runs on the GPU machine (device tool), from the repository root, the Qwen2.5-Coder-1.5B-Instruct work:
#   0. here: ../shared/tools/prepare-device-carry qwen2.5-coder-1.5b   (fills .carry/pNN and .carry/whl)
#            mkdir -p .carry/data && cp -r ../shared/data/{paul_graham_essays,ruler,longbench} .carry/data/
#            pip download --no-deps -d .carry/whl wonderwords rouge   (RULER's word lists, LongBench's ROUGE-L) and
#            pip wheel --no-deps -w .carry/whl jieba   (LongBench's Chinese metrics; an sdist only): the GPU machine lacks them
#            python3 scripts/deltakv-corpus.py .carry/data/corpus/general-english.txt.gz   (7.5 MB; for `train` only)
#      (prepare-device-carry sizes the parts to fit 64 MiB beside the tree as it is: re-run it when the tree grows; it
#      rewrites .carry/whl with the gguf wheel only, so run the two pip lines after it)
#   1. one call per part, carry [".carry/pNN"]:  bash scripts/gpu/qwen.sh part .carry/pNN
#      back to back, nothing between them: the machine is given back 30 s after a call, and the parts with it
#      (send every part, setup and the first sweep as one batch of calls: on 2026-12-04 the pause between two
#      batches of calls lost the machine twice, 8 parts each time, though `status` had just said it was warm)
#      (up to setup too: on 2026-12-03 three minutes of local work between `wheels` and `setup` lost the machine
#      and its 32 parts, 300 s of device time)
#   2. carry [".carry/whl", ".carry/data"]:       bash scripts/gpu/qwen.sh setup   (joins, checks, converts once)
#      (when tree + whl + data pass 64 MiB: first `qwen.sh wheels` carrying .carry/whl, then setup without it)
#   3. then, while the machine stays warm:        bash scripts/gpu/qwen.sh sweep A.yaml[,B.yaml][+C.yaml] [SECONDS]
#      (chained after setup, which takes about 110 s, give the sweep at most 460 SECONDS: a call past the device's
#      600 s is killed before the sweep writes $OUT/runs.tar.gz; the runs stay on the warm machine, not here)
#      or, to keep every lane busy to the end:    bash scripts/gpu/qwen.sh share A.yaml,B.yaml,C.yaml 4 [SECONDS]
#   The sweeps skip every point the committed leaderboard (results/qwen/leaderboard.json) lists as complete
#   (`kvbench sweep --recorded`): a sweep config names its whole grid and the GPU runs only what is missing;
#   `kvbench sweep CONFIG --recorded results/qwen/leaderboard.json --plan --device cuda` lists it here first.
#   A config written `CONFIG@all` runs whole (`RECORDED= ...`: every config of the call does): to re-run recorded
#   points whose samples the table lacks, e.g. for paired comparisons (results/compresskv/sweep-qwen-paired.yaml).
#   If the machine is taken back, copy the last call's runs.tar.gz to .carry/runs.tar.gz and carry it with setup:
#   the fresh machine resumes the cut runs (about 1.6 MB for 45 runs).
#   Fold each call's runs into that table here before the next call (`kvbench leaderboard --root NEW --with
#   results/qwen/leaderboard.json --out results/qwen --drop length=31744`): when the machine is taken back between
#   calls, a fresh one then skips them too (on 2026-12-02 it re-ran two finished RULER runs for want of this).
# Each sweep call leaves $OUT/runs.tar.gz (every run folder so far) and $OUT/sweep-N.log (one per lane); a sweep cut by its time
# limit resumes at the next call on the same machine (the runner's resume). Lanes (`+`) run at once on the one GPU; the
# same config in several lanes (A.yaml+A.yaml+A.yaml) shares its points out: a lane skips what another holds or
# finished (the run directory's lock), so a long sweep (RULER: 3.5 min a run) spreads over lanes by itself.
set -uo pipefail
root=$(pwd)
assets=/tmp/kvbench-assets
name=qwen2.5-coder-1.5b-instruct-q4_k_m.gguf
sha=cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046
export KVBENCH_CACHE=/tmp/kvbench-cache PYTHONPATH=/tmp/kvbench-site:${PYTHONPATH:-} PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
source "$(dirname "${BASH_SOURCE[0]}")/install-kvbench.sh"  # install_kvbench: once per machine
shared_data() {  # the sweep configs read ../shared/data, which does not travel: point it at the carried copy
  [ -d /tmp/kvbench-data ] && mkdir -p "$root/../shared" && ln -sfn /tmp/kvbench-data "$root/../shared/data"; }
case "${1:-}" in
part)  # part DIR [DEST]: DEST /tmp/kvbench-assets for SmolLM2's parts (scripts/gpu/gpu-setup.sh), which setup keeps
  dest=${3:-$assets/parts}; mkdir -p "$dest" && cp "$2"/* "$dest"/ && ls "$dest" | wc -l ;;
wheels)  # optional, before setup, carry [".carry/whl"]: when the tree + whl + data outgrow 64 MiB
  mkdir -p /tmp/kvbench-whl && cp .carry/whl/*.whl /tmp/kvbench-whl/ && ls /tmp/kvbench-whl ;;
setup)
  # a join that fails its checksum is removed, so that setup run again (the missing parts carried) joins anew
  cd $assets && { [ -f $name ] || cat $(ls -v parts/part*) > $name; } && { echo "$sha  $name" | sha256sum -c \
    || { echo "$(ls parts 2>/dev/null | wc -l) parts here: carry the missing ones, then setup again" >&2; rm -f $name; exit 1; }; } \
    && rm -rf parts && python3 -m pip install -q --no-index --no-deps --target /tmp/kvbench-site \
       $(ls "$root"/.carry/whl/*.whl 2>/dev/null || ls /tmp/kvbench-whl/*.whl)
  PYTHONPATH=/tmp/kvbench-site python3 -c "import gguf, wonderwords, jieba, rouge" || { echo "carry the gguf, wonderwords, jieba and rouge wheels in .carry/whl" >&2; exit 1; }
  cd "$root" && rm -rf /tmp/kvbench-data && cp -r .carry/data /tmp/kvbench-data
  # a machine lost mid-session: the last call's runs (its $OUT/runs.tar.gz, carried as .carry/runs.tar.gz) come
  # back, so cut runs resume where they stopped and finished ones are skipped (their locks are flocks: not held)
  # results/qwen/in-flight/*.tar.gz: a session's cut runs committed, for a next session whose checkout has no .carry
  # (fold them, then delete the file); .carry/runs.tar.gz, if newer, after it
  for t in results/qwen/in-flight/*.tar.gz .carry/runs.tar.gz; do
    [ -f "$t" ] && tar xzf "$t" && echo "restored $t: $(ls results/runs | wc -l) run folders"; done
  mkdir -p $KVBENCH_CACHE/gguf && ln -f $assets/$name $KVBENCH_CACHE/gguf/$name
  install_kvbench
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  python3 -c "import torch, transformers, triton; print('torch', torch.__version__, 'transformers', transformers.__version__, 'triton', triton.__version__)"
  time python3 -c "from kvbench import models; lm = models.load('qwen2.5-coder-1.5b'); print(lm.name, lm.window)" 2>&1 | grep -v "^Loading" ;;
sweep)
  # without the converted model every run would crash on a PyPI fetch the machine cannot make (2026-12-04: 100 s)
  [ -f $KVBENCH_CACHE/gguf/$name ] || { echo "no $name in $KVBENCH_CACHE/gguf: run setup first" >&2; exit 2; }
  shared_data; install_kvbench >/dev/null
  # CONFIG may be several: comma-separated ones run one after the other, '+' separates lanes that run at once on
  # the one GPU (a 1.5B model leaves it mostly idle); lanes' runs record KVBENCH_SHARED_DEVICE, so the leaderboard
  # shows no speed for them (their timings measure the contention, not the method).
  # METHODS=a,b (the environment): only those methods of every config (`kvbench sweep --methods`)
  lanes=(${2//+/ }); export KVBENCH_SHARED_DEVICE=${#lanes[@]} RECORDED=${RECORDED-results/qwen/leaderboard.json} METHODS=${METHODS-}
  # every minute a snapshot of the runs into $OUT (written whole, then renamed): a call the device cuts at its
  # limit (the session's device time running out) returns what was left in $OUT, so the samples then come back too
  # (tar exits 1 when a file changed as it read it, which a lane's appends do: the archive is whole, and a torn
  # last line is trimmed when the run resumes)
  ( while sleep 60; do tar czf "$OUT/.runs.tar.gz" results/runs results/sweeps 2>/dev/null; [ $? -le 1 ] \
      && mv "$OUT/.runs.tar.gz" "$OUT/runs.tar.gz"; done ) & snapshots=$!
  for i in "${!lanes[@]}"; do
    timeout "${3:-540}" bash -c 'for c in ${0//,/ }; do case $c in *@all) kvbench sweep "${c%@all}" ${METHODS:+--methods "$METHODS"} ;;
      *) kvbench sweep "$c" ${RECORDED:+--recorded "$RECORDED"} ${METHODS:+--methods "$METHODS"} ;; esac; done' \
      "${lanes[$i]}" > "$OUT/sweep-$i.log" 2>&1 &
  done; wait $(jobs -p | grep -vx "$snapshots"); kill $snapshots
  for i in "${!lanes[@]}"; do grep -v "^Loading" "$OUT/sweep-$i.log" | tail -25; done
  # its own temporary name: a snapshot's tar may outlive the loop killed above
  tar czf "$OUT/.runs-end.tar.gz" results/runs results/sweeps 2>/dev/null && mv "$OUT/.runs-end.tar.gz" "$OUT/runs.tar.gz"
  ls -la "$OUT" ;;
share)
  # `share A.yaml,B.yaml,... N [SECONDS]`: N lanes that all walk the whole list, each from another place in it
  # (lane i starts at config i), so no lane idles while points are left: a point another lane holds is skipped
  # (its lock), a finished one too. On 2026-12-03 a lane of two short configs idled 7 of its 9 minutes beside
  # lanes of 15-minute RULER runs.
  configs=(${2//,/ }) n=${3:-4} lanes=""
  for ((i = 0; i < n; i++)); do
    k=$((i % ${#configs[@]})); rotated=("${configs[@]:k}" "${configs[@]:0:k}")
    lanes+="${lanes:++}$(IFS=,; echo "${rotated[*]}")"
  done
  echo "lanes: $lanes"; [ -n "${DRY:-}" ] || exec bash "$0" sweep "$lanes" "${4:-540}" ;;
train)
  # The trained methods' Qwen artifacts, for results/sweep-qwen-trained-*.yaml (they load them from checkpoints/):
  # DeltaKV's compressors and KV-CAR's autoencoders (latents 32:96 of 128: half the K/V), MINUTES of training each,
  # both at once on the one GPU, on the general-English corpus (never evaluation text). Carry it first:
  # `python3 scripts/deltakv-corpus.py .carry/data/corpus/general-english.txt.gz` here (setup copies .carry/data).
  # Weights stay on the machine (too large to commit); their artifact.json / config.json come back in $OUT.
  shared_data; install_kvbench >/dev/null
  corpus=/tmp/kvbench-data/corpus/general-english.txt.gz m=${2:-4}
  # both trainings and four sweep lanes share the 140 GB: on 2026-12-02 KV-CAR's ran out of memory beside them
  # (62 GB of its own, the whole batch's float32 logits among them; the loss is chunked since)
  export PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True
  [ -f $corpus ] || { echo "no corpus at $corpus: build it into .carry/data/corpus before setup" >&2; exit 2; }
  ( timeout $((${m%.*} * 60 + 240)) kvbench train kvcar --model qwen2.5-coder-1.5b --data $corpus \
      --out checkpoints/kvcar-qwen2.5-coder-1.5b --latent-dim 32 --latent-dim-v 96 --batch 16 --seq-len 1024 \
      --recon-steps 100000 --lm-steps 100000 --max-minutes $m --dtype bfloat16 2>&1 | grep -v "^Loading" > "$OUT/train-kvcar.log"
    cp checkpoints/kvcar-qwen2.5-coder-1.5b/artifact.json "$OUT/kvcar-qwen2.5-coder-1.5b.json" ) &
  ( timeout $((${m%.*} * 60 + 240)) kvbench train deltakv --model qwen2.5-coder-1.5b --data $corpus \
      --out checkpoints/deltakv-qwen2.5-coder-1.5b --steps 100000 --batch 8 --seq-len 1024 --max-minutes $m \
      --dtype bfloat16 2>&1 | grep -v "^Loading" > "$OUT/train-deltakv.log"
    cp checkpoints/deltakv-qwen2.5-coder-1.5b/config.json "$OUT/deltakv-qwen2.5-coder-1.5b.json" ) &
  wait; tail -n 4 "$OUT"/train-*.log ;;
train-kvcar)
  # KV-CAR alone, longer (the whole GPU but the lanes beside it): `train-kvcar MINUTES NAME [trainer options]`
  # writes checkpoints/NAME; its weights (about 12 MB) come back in $OUT with the JSON, so a later machine can be
  # given the same codec (carry it into checkpoints/NAME) instead of a retrained one.
  shared_data; install_kvbench >/dev/null; export PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True
  m=$2 name=$3; shift 3
  timeout $((${m%.*} * 60 + 150)) kvbench train kvcar --model qwen2.5-coder-1.5b \
    --data /tmp/kvbench-data/corpus/general-english.txt.gz --out checkpoints/$name --latent-dim 32 --latent-dim-v 96 \
    --batch 16 --seq-len 1024 --recon-steps 100000 --lm-steps 100000 --max-minutes $m --dtype bfloat16 "$@" 2>&1 \
    | grep -v "^Loading" > "$OUT/train-$name.log"
  # $OUT returns at most 8 files of at most 16 MiB: the weights come back in two parts (`qwen.sh codec` joins them),
  # with the JSON and the log 4 files, so beside this at most three sweep lanes (a lane's log, and runs.tar.gz)
  # WEIGHTS=0: the JSON and the log only (two trainings in one call would pass the 8 files; the weights stay here)
  cp checkpoints/$name/artifact.json "$OUT/$name.json" && [ "${WEIGHTS:-1}" = 1 ] && for f in checkpoints/$name/*.safetensors; do
    split -b 15M -d "$f" "$OUT/$name-$(basename "$f").part-"; done; ls -la "$OUT"
  tail -n 6 "$OUT/train-$name.log" ;;
codec)
  # A codec a train-kvcar call returned, carried to a fresh machine: `codec DIR NAME`, DIR holding NAME.json and
  # NAME-tensors.safetensors.part-* from that call's $OUT (carry DIR); rebuilds checkpoints/NAME and checks it with
  # the loader the runs use (kvbench.artifact.load: the tensors' checksum), so a part missing or out of order fails here
  install_kvbench >/dev/null
  mkdir -p checkpoints/$3 && cat "$2"/$3-tensors.safetensors.part-* > checkpoints/$3/tensors.safetensors \
    && cp "$2/$3.json" checkpoints/$3/artifact.json \
    && python3 -c "from kvbench.artifact import load; load('checkpoints/$3', 'kvcar')" && echo "checkpoints/$3 rebuilt" ;;
calibrate)
  # CompressKV's calibration of Qwen2.5-Coder-1.5B (GRID as `kvbench calibrate compresskv --grid` takes it); resumes
  # when cut by its time limit; the artifact is copied into checkpoints/ (for the sweep) and to $OUT (to commit).
  shared_data; install_kvbench >/dev/null
  timeout "${3:-300}" kvbench calibrate compresskv --model qwen2.5-coder-1.5b --out /tmp/compresskv-qwen2.5-coder-1.5b \
    --grid "$2" --haystack ../shared/data/paul_graham_essays --layer-samples 8 --dtype bfloat16 2>&1 | grep -v "^Loading" | tail -20
  [ -d /tmp/compresskv-qwen2.5-coder-1.5b ] && cp -r /tmp/compresskv-qwen2.5-coder-1.5b checkpoints/ \
    && cp /tmp/compresskv-qwen2.5-coder-1.5b/artifact.json "$OUT/compresskv-qwen2.5-coder-1.5b.json" ;;
*) echo "usage: $0 part DIR | wheels | setup | sweep CONFIG[,CONFIG...] [SECONDS] | share CONFIG,CONFIG... N [SECONDS] | train [MINUTES] | train-kvcar MINUTES NAME [OPTIONS] | codec DIR NAME | calibrate GRID [SECONDS]" >&2; exit 2 ;;
esac
