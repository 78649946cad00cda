#!/usr/bin/env bash
# One device call's work (train/GPU.md): import the project offline, run the CUDA checks, train the campaign for a
# bounded time on the GPU, and leave everything the call returns under $OUT (at most 8 files of 16 MiB):
#   burst.log  this script's whole output     checks.json  the checks' PASS/FAIL/SKIP lines and details
#   burst.json throughput, memory, config     model/       config.json, metrics.jsonl, model.safetensors.NN parts
#
#   train/gpu_burst.sh --within 380               on the device ($OUT set by the tool): all done in 380 s, the
#                                                 training gets what the checks leave, less 60 s for set-up/export
#   train/gpu_burst.sh --skip-checks --within 150 a rerun whose checks already came back
#   train/gpu_burst.sh --max-minutes 2            or a fixed bound for the training loop alone
#   train/gpu_burst.sh --dry-run [--out DIR]      on a CPU: the payload check, then the same steps for ~30 s
set -uo pipefail
cd "$(dirname "$0")/.."

dry=0 checks=1 minutes="" within="" out="${OUT:-}" data=packs/gpu scratch=""
while [ $# -gt 0 ]; do
    case "$1" in
        --dry-run) dry=1 ;;
        --skip-checks) checks=0 ;;
        --max-minutes) minutes="$2"; shift ;;
        --within) within="$2"; shift ;;
        --out) out="$2"; shift ;;
        --data) data="$2"; shift ;;
        *) echo "gpu_burst: unknown argument $1 (see the head of $0)" >&2; exit 2 ;;
    esac
    shift
done
if [ -n "${PYTHON:-}" ]; then py="$PYTHON"; elif [ -x .venv/bin/python ]; then py=.venv/bin/python; else py=python3; fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1

if [ "$dry" = 1 ]; then
    # what the call would send: the tree plus the pack; the device refuses more than 64 MiB
    "$py" train/payload.py --carry packs/gpu \
        || { echo "gpu_burst: the payload is over the device's limit" >&2; exit 1; }
    export OMP_NUM_THREADS=1              # 2 shared cores: one thread each keeps a dry run from thrashing
    out="${out:-$(mktemp -d)}"
    minutes="${minutes:-0.1}"
    if [ ! -d "$data" ]; then             # a clean clone has no pack: rehearse on scikit-image's photos
        scratch="$(mktemp -d)"
        data="$scratch/pack"
        "$py" train/make_pack.py --src skimage --out "$data" --budget 3000000 || exit 1
    fi
    train_args=(--dry-run --loader-seconds 2)
    check_limit=900                       # a shared CPU can be slow; the bound is for hung CUDA calls
else
    [ -n "$out" ] || { echo "gpu_burst: \$OUT is not set (the device tool sets it; or pass --out DIR)" >&2; exit 2; }
    [ -n "$minutes$within" ] || { echo "gpu_burst: give --within SECONDS or --max-minutes M" >&2; exit 2; }
    train_args=()
    check_limit=240
fi
mkdir -p "$out"
exec > >(tee -a "$out/burst.log") 2>&1   # the log comes back even if the call is killed at its limit
tee_pid=$!

echo "== gpu_burst $(date -u +%FT%TZ) dry_run=$dry within=${within:-none} max_minutes=${minutes:-auto}" \
     "data=$data out=$out"
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
"$py" -c "import sys, torch, accelerate, teasr_cli.trainer as t; print('import: python', sys.version.split()[0], \
'torch', torch.__version__, 'cuda', torch.cuda.is_available(), 'accelerate', accelerate.__version__, \
'teasr', t.__file__)" \
    || { echo "FAIL import: the project does not import here"; exit 1; }
[ -d "$data" ] || echo "FAIL data: no photo pack at $data (carry packs/gpu, made by train/make_pack.py)"

t0=$SECONDS
if [ "$checks" = 1 ]; then
    # bounded: a hung CUDA call must not eat the training's minutes
    timeout "$check_limit" "$py" train/cuda_checks.py --json "$out/checks.json"
    echo "checks: $((SECONDS - t0)) s"
fi
if [ -n "$within" ]; then   # what is left of the call, less set-up, the loader's timing, export and copying
    left=$(( within - SECONDS - 60 ))
    [ "$left" -ge 30 ] || { echo "FAIL time: only $left s left for training of --within $within"; exit 1; }
    minutes=$("$py" -c "import sys; print(round(min(float(sys.argv[1] or 1e9), int(sys.argv[2]) / 60), 2))" \
              "$minutes" "$left")
    echo "training bound: $minutes min ($((SECONDS)) s used of $within)"
fi
rc=0
if [ -d "$data" ]; then
    "$py" train/gpu_train.py --out "$out" --max-minutes "$minutes" --data "$data" "${train_args[@]}" || rc=$?
else
    rc=1
fi

echo "== summary"
[ -f "$out/checks.json" ] && "$py" -c "import json, sys; c = json.load(open(sys.argv[1]))['checks']; \
print('\n'.join(f\"{v['status']} {k}: {v['line']}\" for k, v in c.items()))" "$out/checks.json"
grep '^throughput:' "$out/burst.log" | tail -1
n=$(find "$out" -type f | wc -l)
big=$(find "$out" -type f -size +16M | wc -l)
echo "out: $n files, $big over 16 MiB$([ "$n" -gt 8 ] || [ "$big" -gt 0 ] && echo ' -- OVER the device limits')"
[ "$n" -le 8 ] && [ "$big" = 0 ] || rc=1
[ -z "$scratch" ] || rm -rf "$scratch"
echo "== gpu_burst done in $SECONDS s, rc $rc"
exec >&- 2>&-
wait "$tee_pid" 2>/dev/null   # the last lines reach the log and the call's output before the tool ends us
exit $rc
