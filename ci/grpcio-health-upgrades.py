"""Python grpcio (gRPC C-core) against a server upgraded by SIGHUP every
100 ms: unary Health.Check calls on shared channels and Watch streams that
are opened again when they end. Counts every status that is not OK."""
import collections, os, signal, sys, threading, time
import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

addr, pid_file = sys.argv[1], sys.argv[2]
duration = float(sys.argv[3]) if len(sys.argv) > 3 else 10
retries = os.environ.get("RETRIES", "0") == "1"
opts = [("grpc.enable_retries", 1 if retries else 0)]
stop = time.time() + duration
lock = threading.Lock()
codes = collections.Counter()
watch_ends = collections.Counter()
errors = []

def unary(channel):
    stub = health_pb2_grpc.HealthStub(channel)
    while time.time() < stop:
        try:
            stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=5)
            code = "OK"
        except grpc.RpcError as e:
            code = e.code().name
            with lock:
                if len(errors) < 5: errors.append(f"Check: {code} {e.details()}")
        with lock: codes[code] += 1

open_calls = set()
def watch(channel):
    stub = health_pb2_grpc.HealthStub(channel)
    while time.time() < stop:
        call = stub.Watch(health_pb2.HealthCheckRequest(service=""))
        with lock: open_calls.add(call)
        try:
            for _ in call: pass
            code = call.code().name
        except grpc.RpcError as e:
            code = e.code().name
            if code == "CANCELLED" and time.time() >= stop:
                break  # cancelled by this script at the end
            if code != "OK":
                with lock:
                    if len(errors) < 5: errors.append(f"Watch: {code} {e.details()}")
        with lock: watch_ends[code] += 1

channels = [grpc.insecure_channel(addr, options=opts) for _ in range(4)]
for c in channels: grpc.channel_ready_future(c).result(timeout=5)
threads = [threading.Thread(target=unary, args=(channels[i % 4],)) for i in range(16)]
threads += [threading.Thread(target=watch, args=(channels[i % 4],)) for i in range(4)]
for t in threads: t.start()
sent = 0
while time.time() < stop - 0.5:
    os.kill(int(open(pid_file).read()), signal.SIGHUP); sent += 1
    time.sleep(0.1)
time.sleep(max(0, stop - time.time()) + 0.2)
with lock:
    for call in open_calls: call.cancel()
for t in threads: t.join(timeout=15)
print(f"grpcio {grpc.__version__} retries={'on' if retries else 'off'}: SIGHUPs {sent}; Check {dict(codes)}; Watch ends {dict(watch_ends)}")
for e in errors: print("  ", e)
sys.exit(0 if set(codes) <= {"OK"} and set(watch_ends) <= {"OK"} else 1)
