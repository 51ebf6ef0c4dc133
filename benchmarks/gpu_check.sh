#!/usr/bin/env bash
# Every GPU check in one go, for a lent GPU machine (about 8 minutes on an H100/H200):
# the GPU tests, the pipeline's throughput with backend=local backend.device=cuda and
# backend=dask_cuda against dd on the same disk, the method table on cuda (JAX included when
# installed), TF32's error, the model zoo against torch.func, and the planner's pick against
# every plan.
#
#   make wheels                      # here, once: the packages a bare GPU image lacks -> .whl/
#   bash benchmarks/gpu_check.sh     # there (results under $OUT, or outputs/gpu-check)
set -uo pipefail
OUT=${OUT:-outputs/gpu-check}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
if [ -d .whl ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl || exit 1
    export PYTHONPATH=/tmp/site:$PWD
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/card.txt"
python3 -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name())" \
    | tee -a "$OUT/card.txt"

timeout 150 python3 -m pytest -q -m gpu tests/test_gpu.py -p no:cacheprovider -rs 2>&1 \
    | tee "$OUT/tests.log"

# The pipeline's throughput (backend.device=cuda, backend=dask_cuda) against dd on the same
# disk, before the method table.
timeout 150 python3 benchmarks/scale.py gpu 2>&1 | tee "$OUT/throughput.txt"

bench="timeout 120 python3 benchmarks/compare_methods.py --device cuda --outputs one --repeats 10"
bench="$bench --skip gist functional --tf32"
$bench --cases mlp784 --samples 256 2>&1 | tee "$OUT/methods.txt"
$bench --cases mlp3072 --samples 32 2>&1 | tee -a "$OUT/methods.txt"
$bench --cases cnn784 --samples 256 2>&1 | tee -a "$OUT/methods.txt"

# The model zoo (class-style models) against torch.func, and the planner's pick against every
# plan (and the symmetric product's two forms) on this device.
timeout 150 python3 benchmarks/zoo.py --device cuda --samples 16 --repeats 5 2>&1 \
    | tee "$OUT/zoo.txt"
timeout 60 python3 benchmarks/plans.py --device cuda --samples 256 --models mlp784 lenet5 \
    tabular_mlp --symmetric 2>&1 | tee "$OUT/plans.txt"
timeout 40 python3 benchmarks/plans.py --device cuda --samples 32 --models mlp3072 2>&1 \
    | tee -a "$OUT/plans.txt"
