export PYTHONUNBUFFERED=1
A="--models resnet18 --variants sgd,oho_greedy,oho_global_full --batch-size 128 --val-batch-size 128 --iters 20 --repeats 2 --profile-steps 0"
M="--models mlp --variants sgd,oho_greedy,oho_global_full --batch-size 128 --val-batch-size 128 --iters 20 --repeats 3 --profile-steps 0"
for t in old new nomt; do
  if [ $t = new ]; then d=$PWD; else d=$PWD/.carry/$t; fi
  echo "== $t"; (cd $d && PYTHONPATH=$d timeout 60 python benchmarks/overhead.py $A --out $OUT/ab_${t}_resnet_b128.json 2>&1 | tail -4)
  (cd $d && PYTHONPATH=$d timeout 30 python benchmarks/overhead.py $M --out $OUT/ab_${t}_mlp.json 2>&1 | tail -4)
done
