"""MODE=base|worker|handoff: record /items transactions, then (not base) run today's worker
encode+gzip or the exporter hand-off over them REPS times; instruction counts by difference."""
import os, sys, zlib, socket, subprocess
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import beatlib
from beatlib.contrib.flask import Beat
from beatlib.transport import process
import app as appmod
client = beatlib.Client(service_name="peerbench", server_url="http://127.0.0.1:9", environment="bench")
records = []
client.tracer.queue = records.append
app = appmod.create_app("http://127.0.0.1:9")
Beat(app, client=client)
c = app.test_client()
for _ in range(int(os.environ.get("N", "200"))):
    c.get("/items").close()
mode, reps = os.environ["MODE"], int(os.environ.get("REPS", "3"))
ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
ours.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 << 20)
ours.setblocking(False)
theirs.setblocking(False)
drain = []
if mode == "worker":
    enc = client._encode
    for _ in range(reps):
        co = zlib.compressobj(2, zlib.DEFLATED, 31)
        for r in records:
            for line in enc(r):
                co.compress(line)
        co.flush()
elif mode == "handoff":
    e = process._encode_record
    for _ in range(reps):
        for r in records:
            ours.send(e(r))
        # empty the socket outside the measured code's pattern: recv costs counted apart
        while True:
            try:
                drain.append(len(theirs.recv(1 << 20)))
            except BlockingIOError:
                break
print(mode, len(records), file=sys.stderr)
