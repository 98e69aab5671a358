#!/usr/bin/env bash
# One batched GPU call: CUDA tests of the final code, then overhead side by side (final, pre-perf, session start).
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name --format=csv,noheader
python -c "import torch; print('torch', torch.__version__)"
timeout 150 python -m pytest -q -p no:cacheprovider -x tests/test_cuda.py tests/test_sgd_equivalence.py tests/test_deferred.py \
  tests/test_mixed_precision.py tests/test_schedulers.py tests/test_state_dict.py tests/test_hyper_groups.py 2>&1 | tail -12 | tee $OUT/cuda_tests.txt
V=sgd,oho_greedy,oho_global_full,oho_global_full_h10
for b in 128 512; do
  timeout 110 python benchmarks/overhead.py --models resnet18 --variants $V,adam,oho_adam_greedy,oho_adam_full --batch-size $b --val-batch-size $b \
    --iters 20 --repeats 2 --out $OUT/overhead_final_b$b.json 2>&1 | tail -14
done
for t in preperf start; do
  (cd .carry/$t && timeout 55 python benchmarks/overhead.py --models resnet18 --variants $V --batch-size 128 --val-batch-size 128 \
    --iters 20 --repeats 2 --out $OUT/overhead_${t}_b128.json 2>&1 | tail -8)
done
timeout 60 python benchmarks/overhead.py --models mlp --variants sgd,oho_greedy,oho_global_full --batch-size 128 --iters 20 --repeats 2 --out $OUT/overhead_final_mlp.json 2>&1 | tail -6
