"""`beatlib serve`: a local intake v2 receiver that stores events in SQLite and shows them
in a server-rendered dashboard at `/ui/`. For one developer's machine; production stays
with Elastic APM Server. Only the standard library, and nothing from the client side.
"""

from beatlib.receiver.server import Receiver, main, run

__all__ = ["Receiver", "main", "run"]
