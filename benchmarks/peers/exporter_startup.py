import sys, time, os, resource
sys.path.insert(0, ".")
from tests.receiver import Receiver
import beatlib
def rss(pid):
    for l in open(f"/proc/{pid}/status"):
        if l.startswith("VmRSS"): return int(l.split()[1]) // 1024
r = Receiver().start()
c = beatlib.Client(service_name="s", server_url=r.url, exporter_process=True)
tx = c.begin_transaction("t")
t0 = time.perf_counter(); tq = time.thread_time()
c.end_transaction("x")   # the first record starts the child
t_queue = time.perf_counter() - t0; cpu_queue = time.thread_time() - tq
ok = c.flush(30)
t_ready = time.perf_counter() - t0
child = c.transport.worker.pid
print("first queue() (starts the child): %.1f ms wall, %.1f ms thread CPU; child answered its first flush after %.0f ms; ok=%s" % (t_queue*1e3, cpu_queue*1e3, t_ready*1e3, ok))
print("RSS app %d MB, exporter child %d MB" % (rss(os.getpid()), rss(child)))
c.close(10); r.stop()
