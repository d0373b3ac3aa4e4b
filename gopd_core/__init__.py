"""gopd: Generalized On-Policy Distillation (G-OPD / ExOPD) library: objective, engines, scoring, training."""

import os

# OpenMP threads that spin while waiting make CPU training 20-30x slower on a busy 2-core machine;
# this only takes effect if set before torch is first imported.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
