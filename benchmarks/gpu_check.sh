#!/usr/bin/env bash
# Every GPU check, for a lent GPU machine, in two parts that each fit one device call (the
# timeouts add up to about 7 and 6 minutes at worst; typical runs take less):
#   part 1: the GPU tests; the pipeline's throughput with backend=local backend.device=cuda and
#           backend=dask_cuda against dd on the same disk; the method table for the tanh MLP
#           (D=784 with 256 samples, D=3072 with 32) with JAX, a plain batched chain and TF32;
#   part 2: the CNN's method table, the model zoo against torch.func, and the planner's pick
#           against every plan (and the symmetric product's two forms) on this device.
#
#   part engine: every figure of the graph engine's issue in one call (at most 9 minutes): the
#           GPU tests, the zoo, the CNN table, the conv nets' plans and the MLP tables.
#
#   make wheels                          # here, once: the packages a bare GPU image lacks -> .whl/
#   bash benchmarks/gpu_check.sh 1       # there (results under $OUT, or outputs/gpu-check)
#   bash benchmarks/gpu_check.sh 2
#   bash benchmarks/gpu_check.sh engine  # after a change to pipeline/hessian
#   bash benchmarks/gpu_check.sh widths  # the standard table at real widths (benchmarks/widths.py)
set -uo pipefail
PART=${1:-all}
OUT=${OUT:-outputs/gpu-check}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
if [ -d .whl ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl || exit 1
    export PYTHONPATH=/tmp/site:$PWD
fi
bench="python3 benchmarks/compare_methods.py --device cuda --outputs one --repeats 10"
bench="$bench --skip gist functional --tf32"

if [ "$PART" = 1 ] || [ "$PART" = all ]; then
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/card.txt"
    python3 -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name())" \
        | tee -a "$OUT/card.txt"
    timeout 120 python3 -m pytest -q -m gpu tests/test_gpu.py -p no:cacheprovider -rs 2>&1 \
        | tee "$OUT/tests.log"
    timeout 120 python3 benchmarks/scale.py gpu 2>&1 | tee "$OUT/throughput.txt"
    timeout 90 $bench --cases mlp784 --samples 256 2>&1 | tee "$OUT/methods.txt"
    timeout 90 $bench --cases mlp3072 --samples 32 2>&1 | tee -a "$OUT/methods.txt"
fi
if [ "$PART" = zoo ] || [ "$PART" = engine ]; then  # GPU tests, zoo, CNN table, conv nets' plans
    timeout 100 python3 -m pytest -q -m gpu tests/test_gpu.py -p no:cacheprovider -rs 2>&1 \
        | tee "$OUT/tests.log"
    timeout 120 python3 benchmarks/zoo.py --device cuda --repeats 5 2>&1 | tee "$OUT/zoo.txt"
    timeout 60 $bench --cases cnn784 --samples 256 2>&1 | tee "$OUT/methods_cnn.txt"
    timeout 60 python3 benchmarks/plans.py --device cuda --samples 32 --models lenet5 \
        mnist_tanh 2>&1 | tee "$OUT/plans.txt"
fi
if [ "$PART" = mlp ] || [ "$PART" = engine ]; then  # the MLP tables again, into methods_mlp.txt
    timeout 90 $bench --cases mlp784 --samples 256 2>&1 | tee "$OUT/methods_mlp.txt"
    timeout 90 $bench --cases mlp3072 --samples 32 2>&1 | tee -a "$OUT/methods_mlp.txt"
fi
if [ "$PART" = 2 ] || [ "$PART" = all ]; then
    timeout 90 $bench --cases cnn784 --samples 256 2>&1 | tee "$OUT/methods_cnn.txt"
    timeout 150 python3 benchmarks/zoo.py --device cuda --repeats 5 2>&1 | tee "$OUT/zoo.txt"
    timeout 60 python3 benchmarks/plans.py --device cuda --samples 256 --models mlp784 lenet5 \
        tabular_mlp --symmetric 2>&1 | tee "$OUT/plans.txt"
    timeout 30 python3 benchmarks/plans.py --device cuda --samples 32 --models mlp3072 2>&1 \
        | tee -a "$OUT/plans.txt"
fi
if [ "$PART" = widths ]; then  # the standard table at real widths, cold and warm (at most 9 min)
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/card.txt"
    timeout 540 python3 benchmarks/widths.py --device cuda --warmups 2 --repeats 5 \
        --json "$OUT/widths.json" 2>&1 | tee "$OUT/widths.txt"
fi
