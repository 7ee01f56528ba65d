#!/bin/bash
# before (main at 1298558) vs after (device_batch = rows per device, and 2), alternating, 2 rounds
cd /work/main
for round in 1 2; do
  (cd /work/wt-old && PYTHONPATH=/work/wt-old /work/main/.venv/bin/python tools/bench_cache.py --json --len 256 --batch 8 --steps 2 --reps 3) > runs/bench/cache_before_$round.json 2>runs/bench/err_before_$round.log
  PYTHONPATH=/work/main .venv/bin/python tools/bench_cache.py --json --len 256 --batch 8 --steps 2 --reps 3 > runs/bench/cache_after_$round.json 2>runs/bench/err_after_$round.log
  PYTHONPATH=/work/main .venv/bin/python tools/bench_cache.py --json --len 256 --batch 8 --steps 2 --reps 3 --set cache.device_batch=2 > runs/bench/cache_after_db2_$round.json 2>runs/bench/err_after_db2_$round.log
done
echo finished > runs/bench/done
