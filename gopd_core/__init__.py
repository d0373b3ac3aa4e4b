"""gopd: Generalized On-Policy Distillation (G-OPD / ExOPD) library: objective, engines, scoring, training."""

import os

# How long an idle OpenMP thread spins before it sleeps (read when torch first loads). Threads that
# sleep at once (OMP_WAIT_POLICY=PASSIVE) halved decoding on an idle 2-core CPU (256 tokens x 8
# rows, 25M model: 12.2 s vs 6.2 s: a decode step is many short parallel regions), while libgomp's
# default spin (300000) lets oversubscribed threads crawl on a busy machine. A short spin kept the
# idle speed (6.4 s) and was 1.8x slower than PASSIVE with two such processes on the 2 cores. Shared
# machines: set OMP_WAIT_POLICY=PASSIVE; a user's own setting of either variable is left alone.
if "OMP_WAIT_POLICY" not in os.environ:
    os.environ.setdefault("GOMP_SPINCOUNT", "10000")
