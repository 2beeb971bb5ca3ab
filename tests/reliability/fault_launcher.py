"""`python tests/reliability/fault_launcher.py FAULT serve ...`: `dgserve serve ...` with a fault wrapped around the
engine it builds, from outside the server's code, once `Engine.__init__` is done (loading and the start-up profile run
clean; torch.device("meta") builds the model by recognising the real torch.empty). FAULT is one of:

- `oom-file:PATH`: whenever the file PATH exists, the engine thread's next torch.empty (the sampler's workspace, the
  largest buffer a step allocates) deletes it and fails as the CUDA caching allocator fails, with
  torch.OutOfMemoryError. The test creates the file to fail the next iteration.
- `oom@N` / `fatal@N`: the N-th call of the model's `denoise` (one per denoising step) raises torch.OutOfMemoryError,
  which fails that iteration's requests, or SystemError, which stops the engine thread. The wrapper is Python: it runs
  in an eager step (a CPU server's default), not in a compiled one.
"""

from __future__ import annotations

import itertools
import os
import re
import sys
import threading
from pathlib import Path

import torch

OOM = "CUDA out of memory. Tried to allocate 2.00 GiB (injected by the test)"


def launcher(fault: str) -> tuple[str, str]:
    """start_server's `launcher` for a server with this fault."""
    return (__file__, fault)


def _fail_allocation_while_exists(trigger: str) -> None:
    empty = torch.empty

    def failing_empty(*args, **kwargs) -> torch.Tensor:
        if threading.current_thread().name == "dgserve-engine" and os.path.exists(trigger):
            os.remove(trigger)
            raise torch.OutOfMemoryError(OOM)
        return empty(*args, **kwargs)

    torch.empty = failing_empty


def _fail_denoise_call(model: torch.nn.Module, at: int, error: type[Exception]) -> None:
    denoise, calls = model.denoise, itertools.count(1)

    def failing_denoise(*args, **kwargs) -> torch.Tensor:
        if next(calls) == at:
            raise error(OOM if error is torch.OutOfMemoryError else "injected fatal fault")
        return denoise(*args, **kwargs)

    model.denoise = failing_denoise  # on the instance: the runner calls self.model.denoise


def _install(model: torch.nn.Module, fault: str) -> None:
    if match := re.fullmatch(r"oom-file:(.+)", fault):
        _fail_allocation_while_exists(match[1])
    elif match := re.fullmatch(r"(oom|fatal)@(\d+)", fault):
        _fail_denoise_call(model, int(match[2]), torch.OutOfMemoryError if match[1] == "oom" else SystemError)


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository root, as `python -m server` has it
    from engine.engine import Engine
    from server.cli import main

    fault = sys.argv.pop(1)
    if not re.fullmatch(r"oom-file:.+|(oom|fatal)@\d+", fault):
        sys.exit(f"fault_launcher.py: FAULT must be oom-file:PATH, oom@N or fatal@N, got {fault!r}")
    init = Engine.__init__

    def init_then_install(self: Engine, *args, **kwargs) -> None:
        init(self, *args, **kwargs)
        _install(self.model, fault)

    Engine.__init__ = init_then_install
    main()
