import os
import sys
import warnings

import matplotlib

matplotlib.use("Agg")
sys.path.insert(0, os.path.dirname(__file__))
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
warnings.filterwarnings("ignore", ".*does not have many workers.*")

import torch  # noqa: E402

torch.set_num_threads(1)  # tiny models: one thread is fastest and keeps timings stable on a shared 2-core machine
