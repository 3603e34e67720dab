"""App-thread CPU per /items transaction: today's worker (encode + gzip level 2, as the
transport) vs the exporter hand-off (flatten + marshal + send on a SEQPACKET socket),
alternating blocks in one process; medians of the blocks."""
import os, sys, time, zlib, statistics, socket, subprocess, marshal, functools
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
for _ in range(300):
    c.get("/items").close()
records.clear()
N = int(os.environ.get("N", "400"))
for _ in range(N):
    c.get("/items").close()
print("records", len(records), "spans", len(records[0].spans), file=sys.stderr)

ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
ours.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 << 20)
drain = subprocess.Popen([sys.executable, "-c",
    "import socket,sys\ns=socket.socket(fileno=int(sys.argv[1]))\nb=bytearray(5<<20)\nwhile s.recv_into(b): pass",
    str(theirs.fileno())], pass_fds=(theirs.fileno(),))
theirs.close()
ours.setblocking(False)

enc = client._encode
def worker_block(recs):
    co = zlib.compressobj(2, zlib.DEFLATED, 31)
    for r in recs:
        for line in enc(r):
            co.compress(line)
    co.flush()

full = [0]
def handoff_block(recs):
    send = ours.send
    e = process._encode_record
    for r in recs:
        try:
            send(e(r))
        except BlockingIOError:
            full[0] += 1

def batch_block(recs, k=16):
    send = ours.send
    e = process._encode_record
    buf = []
    for r in recs:
        buf.append(e(r))
        if len(buf) >= k:
            try:
                ours.sendmsg(buf)
            except BlockingIOError:
                full[0] += 1
            buf = []

def send_only(recs, frames=[]):
    if not frames:
        frames.extend(process._encode_record(r) for r in recs)
    send = ours.send
    for f in frames:
        try:
            send(f)
        except BlockingIOError:
            full[0] += 1

def flatten_block(recs):
    f = process.flatten_transaction
    for r in recs:
        f(r)

def marshal_block(recs):
    f = process.flatten_transaction
    for r in recs:
        marshal.dumps(f(r))

def context_only(recs):
    for r in recs:
        r.context["request"]()

variants = {"worker": worker_block, "handoff": handoff_block, "flatten": flatten_block,
            "flatten+marshal": marshal_block, "request_context()": context_only,
            "handoff batch16": batch_block, "send only": send_only}
res = {k: [] for k in variants}
BLOCKS = int(os.environ.get("BLOCKS", "40"))
for b in range(BLOCKS):
    order = list(variants) if b % 2 == 0 else list(reversed(variants))
    for name in order:
        t = time.thread_time_ns()
        variants[name](records)
        res[name].append((time.thread_time_ns() - t) / len(records) / 1000)
    time.sleep(0.05)  # let the drain process catch up
size = len(process._encode_record(records[0]))
print("frame bytes/txn", size, "socket full drops", full[0])
for k, v in res.items():
    print("%-18s median %7.1f us/txn  (p25 %.1f p75 %.1f, %d blocks)" % (
        k, statistics.median(v), *statistics.quantiles(v, n=4)[0:3:2], len(v)))
w, h = statistics.median(res["worker"]), statistics.median(res["handoff"])
print("ratio handoff/worker %.3f" % (h / w))
ours.close(); drain.wait(5)
