"""A callback for the resume tests: SIGKILL this process when a training step is about to start."""

import os
import signal

import lightning as L


class KillAt(L.Callback):
    def __init__(self, step: int):
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.step:
            os.kill(os.getpid(), signal.SIGKILL)
