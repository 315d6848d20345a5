#!/usr/bin/env bash
# Every GPU measurement of issues 14-16, in four parts that each fit one device call (10 minutes) on one
# H100: `bench/gpu_suite.sh offline` (CUDA tests, engine vs transformers and each optimisation switched
# off in turn, host overhead), `int8` (int8 memory; per linear, per decode step, offline and token
# agreement against fp16), `served` (load at 1/16/64/256 clients, engine process vs thread; 4 HTTP
# processes) and `variants` (served without background vision, without overlapped steps, with float32
# pixels); and `quick`, what fits a whole 15-minute lease (the CUDA tests; ours vs transformers at
# opt-2.7b shapes). Logs go to $OUT (or bench/out).
#
# The device machine lacks some of the server's packages: carry their wheels (see the device tool's
# README) for fastapi, starlette, uvicorn, h11, click, pydantic, pydantic-core, pydantic-settings,
# python-dotenv, annotated-types, typing-inspection, python-multipart, bitsandbytes, opentelemetry-api,
# typing-extensions, pyzmq, msgspec; install them to a folder on PYTHONPATH before running this script.
set -uo pipefail
part=${1:-all}
out=${OUT:-bench/out}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD:${PYTHONPATH:-}"
nvidia-smi >"$out/nvidia-smi.txt" 2>&1
if [ "$part" = quick ]; then
    # What fits a 15-minute lease (machine start and transfers included): each step time-boxed, printed
    # to stdout as it goes (the run's output_tail comes back even when $OUT does not), and killed with
    # SIGABRT, on which Python's faulthandler prints where every thread was (a hang shows its place).
    # Plugins of the device image's other packages are not loaded into pytest.
    export PYTHONFAULTHANDLER=1 PYTEST_DISABLE_PLUGIN_AUTOLOAD=1
    step() { echo "== $(date +%T) $1"; shift; timeout -k 15 -s ABRT "$@"; local rc=$?; echo "== $(date +%T) rc=$rc"; }
    step "imports" 90 python -c "import torch, transformers, triton; print(torch.__version__, transformers.__version__, triton.__version__, torch.cuda.is_available())"
    step "test_cuda" 200 python -m pytest -q -p no:cacheprovider -p pytest_timeout --timeout 100 -o addopts="-m 'not slow'" \
        tests/test_cuda.py tests/test_static_decode.py tests/test_static_vision.py 2>&1 | tee "$out/test_cuda.txt"
    step "bench_engine" 150 python bench/bench_engine.py --size opt-2.7b --batches 1,32,128 --repeats 3 \
        --peak-tflops 989 --peak-tbps 4.3 --variants default,no-graphs 2>&1 | tee "$out/engine.txt"
fi
if [ "$part" = offline ] || [ "$part" = all ]; then
    python -m pytest -q -p no:cacheprovider tests/test_cuda.py 2>&1 | tee "$out/test_cuda.txt"
    python bench/bench_engine.py --size opt-2.7b --batches 1,8,32,64,128 --peak-tflops 989 --peak-tbps 3.1 --variants default,no-overlap,no-prefill-graphs,no-graphs 2>&1 | tee "$out/engine.txt"
    python bench/host_overhead.py 2>&1 | tee "$out/host.txt"
fi
if [ "$part" = int8 ] || [ "$part" = all ]; then
    python bench/int8_memory.py --device cuda 2>&1 | tee "$out/int8.txt"
    python bench/bench_int8.py --size opt-2.7b 2>&1 | tee "$out/bench_int8.txt"
fi
if [ "$part" = served ] || [ "$part" = variants ] || [ "$part" = all ]; then
    ckpt=$(mktemp -d)
    python bench/random_checkpoint.py --size opt-2.7b --out "$ckpt" >/dev/null
    srv="--device cuda --max-running-seqs 256 --max-queue 2048 --max-batch-images 64"
fi
if [ "$part" = served ] || [ "$part" = all ]; then
    # The engine in its own process vs in the HTTP process (the baseline), side by side.
    python bench/load.py --model "$ckpt" --engines thread,process --server-args "$srv" --clients 4 \
        --requests 2000 --concurrency 1,16,64,256 2>&1 | tee "$out/load.txt"
    # More HTTP processes (JPEG decoding, JSON) in front of the one engine: the default is 1 (2-core CPU).
    python bench/load.py --model "$ckpt" --engines process --server-args "$srv --api-workers 4" \
        --clients 4 --requests 2000 --concurrency 64,256 2>&1 | tee "$out/load-4-workers.txt"
fi
if [ "$part" = variants ] || [ "$part" = all ]; then
    # Vision inside the engine step instead of in the background.
    python bench/load.py --model "$ckpt" --engines process --server-args "$srv --no-background-vision" \
        --clients 4 --requests 2000 --concurrency 64,256 2>&1 | tee "$out/load-no-bg-vision.txt"
    # Each step's tokens read before the next step is launched (overlap off).
    python bench/load.py --model "$ckpt" --engines process --server-args "$srv --no-overlap" \
        --clients 4 --requests 2000 --concurrency 1,64,256 2>&1 | tee "$out/load-no-overlap.txt"
    # Pixels normalised in the HTTP processes and sent as float32 (four times the bytes).
    python bench/load.py --model "$ckpt" --engines process --server-args "$srv --no-raw-pixels" \
        --clients 4 --requests 2000 --concurrency 64,256 2>&1 | tee "$out/load-float-pixels.txt"
fi
