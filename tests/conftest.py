"""Shared test settings: one intra-op thread (tiny matrices; avoids oversubscribing the 2-core CI machine)."""

import os

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")

import torch

torch.set_num_threads(1)
