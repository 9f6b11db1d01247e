"""The workload of tests/tests/dubbo.rs: calls a Dubbo 2 service through the interception
with dubbo-ssl-python (PyPI), an unmodified Dubbo client with its own Hessian 2 codec,
and prints what came back as one JSON object.

  dubbo_client.py tally HOST:PORT N METHODS ARGS APP
      N calls: method METHODS[i % len] (comma-separated), one argument ARGS[i % len]
      (';'-separated, {i} replaced by i), attachment application=APP (none for '-');
      counts "METHOD:K>PROVIDER" (K: which of ARGS).
  dubbo_client.py pipeline HOST:PORT THREADS CALLS TAG
      THREADS threads share the client's one connection; each makes CALLS calls of
      echo(TAG-thread-i, random delay 0..20 ms), so requests are pipelined and answered out
      of order; counts results that carry the caller's own argument ("ok") and others.
  dubbo_client.py heartbeat HOST:PORT SECONDS
      one call, then the client's own heartbeat loop runs for SECONDS with a zero idle
      time (a heartbeat every 30 ms), then one more call; counts heartbeats sent and
      answered, and reconnections for unanswered ones.
  dubbo_client.py call HOST:PORT METHOD ARG
      one call; prints the result or the error.
  dubbo_client.py badinput HOST:PORT
      raw frames on sockets of its own (the client's encoder makes the valid ones): an
      undecodable body between two good requests on one connection, a frame with a bad
      magic, one announcing a body of 70,000 bytes, a good one of about 60,000 bytes;
      reports each answer or whether the proxy closed the connection.
"""
import json
import logging
import random
import socket
import struct
import sys
import threading
import time

from dubbo_ssl.client import DubboClient
from dubbo_ssl.codec.decoder import Response
from dubbo_ssl.codec.encoder import Request
from dubbo_ssl.connection import connections

SERVICE = "org.example.Greeter"

mode, host = sys.argv[1], sys.argv[2]


def request_frame(method, args, rid):
    """A request as the client encodes it, with request id `rid`."""
    f = Request({"dubbo_version": "2.4.10", "version": "1.0.0", "method": method,
                 "path": SERVICE, "arguments": args, "group": "", "context": None}).encode()
    f[4:12] = struct.pack("!q", rid)
    return bytes(f)


def connect():
    ip, port = host.rsplit(":", 1)
    s = socket.create_connection((ip, int(port)), timeout=10)
    return s


def read_response(s):
    """(id, status, decoded body), or 'closed' when the proxy ended the connection."""
    head = b""
    try:
        while len(head) < 16:
            chunk = s.recv(16 - len(head))
            if not chunk:
                return "closed"
            head += chunk
        _, flags, status, rid, blen = struct.unpack("!HBBqi", head)
        body = b""
        while len(body) < blen:
            chunk = s.recv(blen - len(body))
            if not chunk:
                return "closed"
            body += chunk
    except ConnectionResetError:
        return "closed"
    r = Response(bytearray(body))
    if status == 20:
        r.read_int()  # the result flag
    return [rid, status, r.read_next()]
client = DubboClient(SERVICE, group="", version="1.0.0", host=host)


def call(method, args, app=None):
    ctx = {"application": app} if app else None
    try:
        return client.call(method, args, context=ctx, timeout=10)
    except Exception as e:  # the client's own exception, with the status and message
        return "error:" + str(e).strip().splitlines()[0]


out = {}
if mode == "tally":
    n, methods, alts, app = int(sys.argv[3]), sys.argv[4].split(","), sys.argv[5].split(";"), sys.argv[6]
    for i in range(n):
        m = methods[i % len(methods)]
        k = i % len(alts)
        r = call(m, [alts[k].replace("{i}", str(i))], None if app == "-" else app)
        key = "%s:%d>%s" % (m, k, r.split("|")[0])
        out[key] = out.get(key, 0) + 1
elif mode == "pipeline":
    threads, calls, tag = int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
    lock = threading.Lock()
    out = {"ok": 0, "wrong": 0, "errors": 0, "samples": []}

    def worker(t):
        for i in range(calls):
            mine = "%s-%d-%d" % (tag, t, i)
            r = call("echo", [mine, random.randint(0, 20)])
            with lock:
                if r.startswith("error:"):
                    out["errors"] += 1
                    out["samples"].append(r)
                elif r.split("|")[3].split(",")[0] == mine:
                    out["ok"] += 1
                else:
                    out["wrong"] += 1
                    out["samples"].append("%s got %s" % (mine, r))

    ts = [threading.Thread(target=worker, args=(t,)) for t in range(threads)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    out["samples"] = out["samples"][:5]
elif mode == "heartbeat":
    seconds = float(sys.argv[3])
    seen = {"sent": 0, "answered": 0, "reconnected": 0}

    class Count(logging.Handler):
        def emit(self, record):
            m = record.getMessage()
            if "Send \u2764 request" in m:
                seen["sent"] += 1
            elif "\u2764 response" in m:
                seen["answered"] += 1
            elif "timeout and reconnected" in m:
                seen["reconnected"] += 1

    log = logging.getLogger("dubbo_ssl")
    log.setLevel(logging.DEBUG)
    log.addHandler(Count())
    out["first"] = call("sayHello", ["hb"])
    # The library never creates this counter (its heartbeat loop then stops at a
    # KeyError); start it at 0 as a fresh connection would.
    connections.connection_pool.client_heartbeats[host] = 0
    connections.TIMEOUT_IDLE = 0
    time.sleep(seconds)
    connections.TIMEOUT_IDLE = 1e9
    time.sleep(0.2)
    out.update(seen)
    out["last"] = call("sayHello", ["hb"])
elif mode == "badinput":
    s = connect()
    s.sendall(request_frame("sayHello", ["before"], 5))
    out["before"] = read_response(s)
    bad = struct.pack("!HBBqi", 0xDABB, 0xC2, 0, 77, 3) + b"\x40\x41\x42"
    s.sendall(bad)
    out["undecodable"] = read_response(s)
    s.sendall(request_frame("sayHello", ["after"], 6))
    out["after"] = read_response(s)
    s.close()
    s = connect()
    s.sendall(b"\xca\xfe" + bytes(14))
    out["bad_magic"] = read_response(s)
    s = connect()
    s.sendall(struct.pack("!HBBqi", 0xDABB, 0xC2, 0, 8, 70000))
    out["over_cap"] = read_response(s)
    s = connect()
    # 30,000 two-byte characters: 60,000 bytes (the package's reader takes a string's
    # length as a signed 16-bit number, so no longer string).
    s.sendall(request_frame("sayHello", ["\u00e9" * 30000], 9))
    r = read_response(s)
    out["under_cap"] = r if r == "closed" else [r[0], r[1], len(r[2])]
elif mode == "call":
    out["result"] = call(sys.argv[3], [sys.argv[4]])
print(json.dumps(out))
sys.stdout.flush()
