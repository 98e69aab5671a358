#!/usr/bin/env bash
# One batched GPU call: CUDA tests of the merged code, then overhead side by side (ResNet18 b128, b512, MLP).
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD:$PWD/.carry/site
nvidia-smi --query-gpu=name --format=csv,noheader
python -c "import torch; print('torch', torch.__version__)"
timeout 140 python -m pytest -q -p no:cacheprovider tests/test_cuda.py tests/test_averaging.py tests/test_sgd_equivalence.py \
  tests/test_deferred.py tests/test_influence.py tests/test_finite_differences.py 2>&1 | tail -15 | tee $OUT/cuda_tests.txt
V=sgd,oho_greedy,oho_global_full,oho_global_full_h10,adam,oho_adam_greedy,oho_adam_full
timeout 130 python benchmarks/overhead.py --models resnet18 --variants $V --batch-size 128 --val-batch-size 128 \
  --iters 20 --repeats 2 --profile-steps 5 --out $OUT/overhead_cuda_h100_b128_resnet18_perf2.json 2>&1 | tail -12
timeout 150 python benchmarks/overhead.py --models resnet18 --variants sgd,oho_greedy,oho_global_full,oho_global_full_h10 --batch-size 512 --val-batch-size 512 \
  --iters 20 --repeats 2 --profile-steps 5 --out $OUT/overhead_cuda_h100_b512_resnet18_perf2.json 2>&1 | tail -8
timeout 50 python benchmarks/overhead.py --models mlp --variants sgd,oho_greedy,oho_global_full --batch-size 128 --val-batch-size 128 \
  --iters 20 --repeats 3 --profile-steps 10 --out $OUT/overhead_cuda_h100_b128_mlp_perf2.json 2>&1 | tail -6
