#!/usr/bin/env bash
# Run the GPU benchmarks in one go, each under its own time limit, and print their tables last.
#
#   bench/device_suite.sh [SECTION ...]      (default: every section; ~25 min on 2 H200s)
#
# Sections: nccl gpu-compile cp-flux cp-hunyuan cp-pool fbc fp8 fp8-gelu vae transfer kernels diffusers
# One device call may run 10 minutes: pass groups that fit (limits below), e.g.
#   nccl cp-flux | gpu-compile | cp-hunyuan kernels | cp-pool vae transfer | fbc diffusers | fp8
# Each section's table is printed as soon as it ends, so a killed call keeps what ran.
# Needs COMFYUI_PATH (a ComfyUI source tree), torch with CUDA, triton, diffusers, torchao.
# Logs go to $OUT (the device tool's output folder) or ./bench-logs.
set -u
cd "$(dirname "$0")/.."
LOGS="${OUT:-bench-logs}"
PY="${PYTHON:-python3}"
export PYTHONUNBUFFERED=1  # a section killed by its time limit still leaves its output
mkdir -p "$LOGS"
QUIET="-e Warning -e return.func -e USDT -e _warn_once"
SECTIONS=("$@")
[ ${#SECTIONS[@]} -eq 0 ] && SECTIONS=(nccl gpu-compile cp-flux cp-hunyuan cp-pool fbc fp8 fp8-gelu vae transfer kernels diffusers)

run() {  # run NAME SECONDS CMD...: the command's output (minus warnings) goes to $LOGS/NAME.txt
    local name=$1 limit=$2
    shift 2
    echo "[$(date +%T)] $name (limit ${limit}s): $*"
    timeout "$limit" "$@" 2>&1 | grep -v $QUIET > "$LOGS/$name.txt"
    echo "[$(date +%T)] $name: exit ${PIPESTATUS[0]}"
    tail -n 20 "$LOGS/$name.txt"  # every bench ends with its table
    echo
}

for section in "${SECTIONS[@]}"; do
    case $section in
        nccl) run nccl 300 $PY -m pytest -q -rs tests/test_attention_nccl.py tests/test_pool_gpu.py \
                  tests/test_device_conds.py tests/test_memory_gpu.py \
                  tests/test_pool_publish.py::test_cuda_weights_publish_through_pinned_staging_in_pieces \
                  tests/test_vae_tiling.py::test_cuda_lookahead_equals_the_cpu_decode ;;
        gpu-compile) run gpu-compile 420 $PY -m pytest -q -rs tests/test_fp8_gpu.py tests/test_compile_gpu.py \
                         tests/test_fp8_gelu_fusion.py tests/test_fp8_norm_fold.py ;;
        cp-flux) run cp-flux 330 $PY bench/profile_context_parallel.py --steps 8 --compile --layouts ulysses,ring ;;
        cp-hunyuan) run cp-hunyuan 420 $PY bench/profile_context_parallel.py --family hunyuan_video --steps 4 \
                        --compile --layouts ulysses,ring ;;
        cp-pool) run cp-pool 400 $PY bench/bench_context_parallel.py --steps 28 --layouts ring --compile ;;
        fbc) run fbc 240 $PY bench/bench_first_block_cache.py --device cuda --size dev --repeats 2 ;;
        fp8) run fp8 540 $PY bench/bench_fp8_compile.py --device cuda ;;
        vae) run vae 240 $PY bench/bench_parallel_vae.py --gpus 2 ;;
        transfer) run transfer 150 $PY bench/bench_transfer.py ;;
        kernels) run kernels 150 $PY bench/bench_attention_kernels.py ;;
        fp8-gelu) run fp8-gelu 120 $PY bench/bench_fp8_gelu_quant.py ;;
        diffusers) run diffusers 330 $PY bench/bench_diffusers_context_parallel.py ;;
        *) echo "unknown section $section" >&2; exit 2 ;;
    esac
done

