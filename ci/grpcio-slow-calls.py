"""grpcio unary calls that each take DELAY ms (echo.Echo/Say of the
project's grpc example) while SIGHUP upgrades the server every 100 ms."""
import collections, os, signal, sys, threading, time
import grpc
addr, pid_file = sys.argv[1], sys.argv[2]
delay = int(os.environ.get("DELAY", "50"))
retries = os.environ.get("RETRIES", "1") == "1"
def varint(n):
    out = b""
    while True:
        b = n & 0x7F; n >>= 7
        out += bytes([b | (0x80 if n else 0)])
        if not n: return out
request = b"\x0a\x02hi" + b"\x10" + varint(delay)
stop = time.time() + 10
codes = collections.Counter(); errors = []; lock = threading.Lock()
def run(ch):
    say = ch.unary_unary("/echo.Echo/Say", request_serializer=lambda b: b, response_deserializer=lambda b: b)
    while time.time() < stop:
        try: say(request, timeout=10); code = "OK"
        except grpc.RpcError as e:
            code = e.code().name
            with lock:
                if len(errors) < 4: errors.append(f"{code} {e.details()}")
        with lock: codes[code] += 1
chs = [grpc.insecure_channel(addr, options=[("grpc.enable_retries", int(retries))]) for _ in range(4)]
ts = [threading.Thread(target=run, args=(chs[i % 4],)) for i in range(32)]
for t in ts: t.start()
sent = 0
while time.time() < stop - 0.3:
    os.kill(int(open(pid_file).read()), signal.SIGHUP); sent += 1; time.sleep(0.1)
for t in ts: t.join()
print(f"grpcio {grpc.__version__} retries={'on' if retries else 'off'} delay={delay}ms: SIGHUPs {sent}; Say {dict(codes)}")
for e in errors: print("  ", e)
