"""`python tests/reliability/oom_launcher.py TRIGGER serve ...`: `dgserve serve ...` in which, once the engine is
built and whenever the file TRIGGER exists, the engine thread's next torch.empty (the sampler's workspace, the largest
buffer a step allocates) fails once as the CUDA caching allocator fails, with torch.OutOfMemoryError. The test creates
the file to fail the next iteration; the server's code is not changed. (Installed after loading: torch.device("meta")
builds the model by recognising the real torch.empty.)"""

from __future__ import annotations

import os
import sys
import threading
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository root, as `python -m server` has it

TRIGGER = sys.argv.pop(1)
_empty = torch.empty


def _failing_empty(*args, **kwargs) -> torch.Tensor:
    if threading.current_thread().name == "dgserve-engine" and os.path.exists(TRIGGER):
        os.remove(TRIGGER)
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (injected by the test)")
    return _empty(*args, **kwargs)


from engine.engine import Engine  # noqa: E402
from server.cli import main  # noqa: E402

_init = Engine.__init__


def _init_then_patch(self, *args, **kwargs) -> None:
    _init(self, *args, **kwargs)
    torch.empty = _failing_empty


Engine.__init__ = _init_then_patch
main()
