"""A Dubbo 2 provider for tests/tests/dubbo.rs, built on the Hessian 2 codec of
dubbo-ssl-python (PyPI): its reader decodes each request body, its writer encodes the
result. Every call is answered with the string

    NAME|SERVICE|METHOD|ARG,ARG,...|APPLICATION

so that the test sees which provider served which request with what arguments. Methods
`echo` (args: text, delay in ms) and `sleep` (args: delay in ms) answer after the delay on
a thread of their own, so responses on one connection come back out of order.

Usage: dubbo_provider.py HOST:PORT NAME STATS_FILE HEARTBEAT_MS
STATS_FILE is rewritten (JSON) as counters change; HEARTBEAT_MS > 0 sends a heartbeat
request on every connection that often and counts the answers.
"""
import json
import os
import re
import socket
import struct
import sys
import threading
import time

from dubbo_ssl.codec.decoder import Response  # Hessian 2 reader
from dubbo_ssl.codec.encoder import Request  # Hessian 2 writer

HOST, PORT = sys.argv[1].rsplit(":", 1)
NAME = sys.argv[2]
STATS_FILE = sys.argv[3]
HEARTBEAT_MS = int(sys.argv[4])

stats = {"requests": 0, "connections": 0, "hb_sent": 0, "hb_answered": 0, "hb_from_peer": 0}
stats_lock = threading.Lock()
TYPE = re.compile(r"\[*(?:L[^;]+;|[ZBCDFIJS])")


def count(key):
    with stats_lock:
        stats[key] += 1
        with open(STATS_FILE + ".tmp", "w") as f:
            json.dump(stats, f)
        os.replace(STATS_FILE + ".tmp", STATS_FILE)


def recv_exact(c, n):
    buf = bytearray()
    while len(buf) < n:
        try:
            chunk = c.recv(n - len(buf))
        except OSError:
            return None
        if not chunk:
            return None
        buf.extend(chunk)
    return bytes(buf)


def encode(value):
    return bytes(b & 0xFF for b in Request({})._encode_single_value(value))


def frame(flags, status, rid, body):
    return struct.pack("!HBBqi", 0xDABB, flags, status, rid, len(body)) + body


def serve(c):
    count("connections")
    wlock = threading.Lock()
    alive = [True]

    def send(data):
        with wlock:
            c.sendall(data)

    def heartbeats():
        hid = 1 << 40
        while alive[0]:
            time.sleep(HEARTBEAT_MS / 1000.0)
            hid += 1
            try:
                send(frame(0xE2, 0, hid, b"N"))
            except OSError:
                return
            count("hb_sent")

    if HEARTBEAT_MS > 0:
        threading.Thread(target=heartbeats, daemon=True).start()
    try:
        while True:
            head = recv_exact(c, 16)
            if head is None:
                return
            magic, flags, status, rid, blen = struct.unpack("!HBBqi", head)
            body = recv_exact(c, blen) if blen else b""
            if body is None:
                return
            if flags & 0x20:
                if flags & 0x80:
                    count("hb_from_peer")
                    if flags & 0x40:
                        send(frame(0x22, 20, rid, b"N"))
                else:
                    count("hb_answered")
                continue
            count("requests")
            r = Response(bytearray(body))
            _dubbo_version = r.read_next()
            path = r.read_next()
            _version = r.read_next()
            method = r.read_next()
            desc = r.read_next()
            args = [r.read_next() for _ in TYPE.findall(desc)]
            attachments = r.read_next() if r.length() > 0 else {}
            result = "%s|%s|%s|%s|%s" % (
                NAME, path, method, ",".join(str(a) for a in args),
                attachments.get("application", ""))
            reply = frame(0x02, 20, rid, b"\x91" + encode(result))
            delay = 0
            if method == "echo" and len(args) > 1:
                delay = int(args[1])
            elif method == "sleep" and args:
                delay = int(args[0])
            if delay:
                def later(reply=reply, delay=delay):
                    time.sleep(delay / 1000.0)
                    try:
                        send(reply)
                    except OSError:
                        pass
                threading.Thread(target=later, daemon=True).start()
            else:
                send(reply)
    finally:
        alive[0] = False
        c.close()


s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((HOST, int(PORT)))
s.listen(256)
while True:
    conn, _ = s.accept()
    threading.Thread(target=serve, args=(conn,), daemon=True).start()
