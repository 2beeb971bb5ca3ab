"""server/connections.py subclasses uvicorn's private `H11Protocol`: the installed uvicorn must still have what it uses.

pyproject pins uvicorn to the versions read for this API; this names what is gone when the pin is moved.
"""

from __future__ import annotations

import asyncio

import uvicorn
from uvicorn.protocols import utils
from uvicorn.protocols.http.h11_impl import H11Protocol, RequestResponseCycle

# GuardedH11Protocol overrides these and calls super() in each.
METHODS = ("connection_made", "connection_lost", "data_received", "on_response_complete",
           "timeout_keep_alive_handler", "pause_writing", "resume_writing")  # fmt: skip
# It reads these, set in H11Protocol.__init__, and replaces timeout_keep_alive on the instance.
PROTOCOL_ATTRIBUTES = ("timeout_keep_alive", "connections", "conn", "headers", "cycle", "loop", "transport")
# It fails a request whose body is late by marking its cycle disconnected and waking the app.
CYCLE_ATTRIBUTES = ("response_started", "disconnected", "message_event")


def _names(function: object) -> set[str]:
    """The attribute and global names a function's code mentions (its assignments to self included)."""
    code = getattr(function, "__code__", None)
    return set(code.co_names) if code else set()


def missing_api(protocol: type, cycle: type) -> list[str]:
    """What connections.py relies on that these classes lack."""
    missing = [f"{protocol.__name__}.{m}()" for m in METHODS if not callable(getattr(protocol, m, None))]
    init = _names(protocol.__init__)
    missing += [f"{protocol.__name__}.{a} (set in __init__)" for a in PROTOCOL_ATTRIBUTES if a not in init]
    # The instance's timeout_keep_alive is what arms the keep-alive timer, else the keep_alive_timeout limit is ignored.
    arming = _names(getattr(protocol, "on_response_complete", None))
    if not {"timeout_keep_alive", "timeout_keep_alive_handler"} <= arming:
        missing.append(f"{protocol.__name__}.on_response_complete() arming its timer from timeout_keep_alive")
    cycle_init = _names(cycle.__init__)
    missing += [f"{cycle.__name__}.{a} (set in __init__)" for a in CYCLE_ATTRIBUTES if a not in cycle_init]
    return missing


def test_the_check_names_what_a_protocol_lacks():
    class Bare(asyncio.Protocol):
        def __init__(self) -> None:
            self.conn = None

    missing = missing_api(Bare, Bare)
    assert "Bare.on_response_complete()" in missing and "Bare.timeout_keep_alive (set in __init__)" in missing
    assert "Bare.conn (set in __init__)" not in missing and "Bare.data_received()" not in missing
    assert "Bare.message_event (set in __init__)" in missing


def test_the_installed_uvicorn_has_the_h11_protocol_api_connections_uses():
    missing = missing_api(H11Protocol, RequestResponseCycle)
    missing += (
        [] if callable(getattr(utils, "get_remote_addr", None)) else ["uvicorn.protocols.utils.get_remote_addr()"]
    )
    assert not missing, (
        f"uvicorn {uvicorn.__version__}'s private H11Protocol no longer has what server/connections.py uses: "
        f"{', '.join(missing)}. Adapt GuardedH11Protocol, or keep uvicorn within pyproject's pin."
    )
