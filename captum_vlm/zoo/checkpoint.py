"""Resumable training state for the zoo recipes that checkpoint (ViLT, LLaVA).

A checkpoint is one ``resume.pt`` file: weights, optimiser state, step, losses, quick checks and
the seconds spent so far. It is written at every quick check, so a stopped run loses at most
``eval_every`` steps.

    >>> state = TrainingState(model, opt, "/tmp/ckpt")
    >>> state.restore()          # True when a checkpoint was found and loaded
    >>> state.save(step)         # after a quick check
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
from tqdm.auto import tqdm


class TrainingState:
    """The progress of one run: ``first`` step, ``losses``, ``checks`` and ``start`` time.

    Args:
        model: the model being trained.
        opt: its optimiser.
        folder: checkpoint folder (None: nothing is saved or restored).
    """

    def __init__(self, model: torch.nn.Module, opt: torch.optim.Optimizer, folder: str | Path | None):
        self.model, self.opt = model, opt
        self.file = Path(folder) / "resume.pt" if folder is not None else None
        self.first = 0
        self.losses: list[float] = []
        self.checks: list[dict] = []
        self.start = time.time()

    def restore(self) -> bool:
        """Load the checkpoint if there is one; the clock continues from its elapsed time.

        Returns:
            True when a checkpoint was loaded.
        """
        if self.file is None or not self.file.is_file():
            return False
        state = torch.load(self.file, weights_only=False)
        self.model.load_state_dict(state["model"])
        self.opt.load_state_dict(state["optimizer"])
        self.first, self.losses, self.checks = state["step"], state["losses"], state["checks"]
        self.start = time.time() - state["elapsed_s"]
        tqdm.write(f"resuming at step {self.first} from {self.file}")
        return True

    def save(self, step: int) -> None:
        """Write the checkpoint of ``step`` (the next step to run); no-op without a folder."""
        if self.file is None:
            return
        self.file.parent.mkdir(parents=True, exist_ok=True)
        state = {
            "model": self.model.state_dict(),
            "optimizer": self.opt.state_dict(),
            "step": step,
            "losses": self.losses,
            "checks": self.checks,
            "elapsed_s": time.time() - self.start,
        }
        torch.save(state, self.file.with_suffix(".tmp"))
        self.file.with_suffix(".tmp").replace(self.file)  # never a half-written checkpoint
