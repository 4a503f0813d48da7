# The pod-side program of the pod scenarios: glibc resolution (getaddrinfo through the
# resolv.conf of the namespace it runs in) and TCP connects, reported as JSON lines.
#   resolve NAME                                  -> {"pid", "addrs"} or {"pid", "error"}
#   connect NAME PORT FAMILY TIMEOUT               -> {"pid", "name", "outcome", "peer", "port"}
#   loop SECONDS MAX_ROUNDS PAUSE TIMEOUT NAME:PORT...   -> {"pid", "rounds", "names": {NAME: {PEER: {OUTCOME: n}}}}
# Every lookup is followed by exactly one connect (to the first address), so a caller can
# count the connects observer must report.
import json
import os
import socket
import sys
import time

FAMILIES = {"any": socket.AF_UNSPEC, "v4": socket.AF_INET, "v6": socket.AF_INET6}


def lookup_connect(name, port, family, timeout):
    try:
        infos = socket.getaddrinfo(name, port, FAMILIES[family], socket.SOCK_STREAM)
    except socket.gaierror as e:
        return {"name": name, "outcome": "resolve-failed", "error": str(e)}
    af, kind, proto, _, addr = infos[0]
    s = socket.socket(af, kind, proto)
    s.settimeout(timeout)
    try:
        s.connect(addr)
        outcome = "established"
    except ConnectionRefusedError:
        outcome = "refused"
    except (socket.timeout, TimeoutError):
        outcome = "timeout"
    except OSError as e:
        outcome = "failed: %s" % e
    finally:
        s.close()
    return {"name": name, "outcome": outcome, "peer": addr[0], "port": addr[1]}


def main():
    mode, args = sys.argv[1], sys.argv[2:]
    out = {"pid": os.getpid()}
    if mode == "resolve":
        try:
            infos = socket.getaddrinfo(args[0], None, socket.AF_UNSPEC, socket.SOCK_STREAM)
            out["addrs"] = sorted({i[4][0] for i in infos})
        except socket.gaierror as e:
            out["error"] = str(e)
    elif mode == "connect":
        out.update(lookup_connect(args[0], int(args[1]), args[2], float(args[3])))
    elif mode == "loop":
        seconds, max_rounds = float(args[0]), int(args[1])
        pause, timeout = float(args[2]), float(args[3])
        targets = [(t.rsplit(":", 1)[0], int(t.rsplit(":", 1)[1])) for t in args[4:]]
        deadline = time.monotonic() + seconds
        names = {}
        rounds = 0
        while rounds < max_rounds and time.monotonic() < deadline:
            for name, port in targets:
                r = lookup_connect(name, port, "any", timeout)
                per_peer = names.setdefault(name, {}).setdefault(r.get("peer", ""), {})
                per_peer[r["outcome"]] = per_peer.get(r["outcome"], 0) + 1
            rounds += 1
            time.sleep(pause)
        out["rounds"] = rounds
        out["names"] = names
    else:
        out["error"] = "unknown mode %s" % mode
    print(json.dumps(out), flush=True)


main()
