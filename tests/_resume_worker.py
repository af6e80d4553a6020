"""Run by tests/test_edges.py in a fresh process: `python _resume_worker.py full|kill|resume RUN`.

`full` trains 3 epochs uninterrupted; `kill` trains the same run and SIGKILLs itself in the
middle of the second epoch, right after writing the metrics logged so far (rows past the first
checkpoint reach the disk, as they would at Lightning's periodic flush); `resume` continues a
killed run. Every step is logged, so metrics.csv has rows on both sides of the checkpoint.
"""

from __future__ import annotations

import os
import signal
import sys

import torch

import selfsup
import selfsup.image.train
from selfsup.image.methods.simclr import SimCLR

OPTIONS = dict(data="digits", limit=256, batch_size=64, epochs=3, backbone="convnet")
STEPS_PER_EPOCH = 256 // 64

torch.set_num_threads(1)
build_trainer = selfsup.image.train._trainer


def trainer_logging_every_step(*args, **kwargs):
    trainer = build_trainer(*args, **kwargs)
    trainer.log_every_n_steps = 1
    return trainer


selfsup.image.train._trainer = trainer_logging_every_step
mode, run = sys.argv[1], sys.argv[2]
if mode == "kill":
    step = SimCLR.training_step

    def killed_mid_epoch(self, batch, batch_idx):
        if self.global_step == STEPS_PER_EPOCH + 2:
            self.trainer.logger.save()
            os.kill(os.getpid(), signal.SIGKILL)
        return step(self, batch, batch_idx)

    SimCLR.training_step = killed_mid_epoch
if mode == "resume":
    selfsup.pretrain(resume=run)
else:
    selfsup.pretrain(method="simclr", out=run, **OPTIONS)
