"""Test-suite settings: one intra-op thread per process.

The suite runs on 2 cores and some tests start two DDP processes; with several OpenMP threads per
process the cores are oversubscribed and small training steps became ~20x slower.
"""

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch

torch.set_num_threads(1)
