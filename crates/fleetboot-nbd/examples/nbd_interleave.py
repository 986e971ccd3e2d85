#!/usr/bin/env python3
"""Two builds of fleetboot's NBD server, read in turn by nbdcopy, round by round.

On a machine shared with other work, the load moves within seconds: comparing two builds
one bench invocation after the other measures the neighbours as much as the builds. Here
both run at once, each an `nbd_bench ... --hold S` (its URIs on stdout), and every round
reads the plain export and the 50 % overlay from each build, in an order that flips each
round (and nbdkit's file plugin from the second, when it serves one).

    ip netns exec NS target-a/nbd_bench 1024 1 nbdcopy --only plain,half --hold 1500 > a.out &
    ip netns exec NS target-b/nbd_bench 1024 1 nbdcopy --only plain,half,nbdkit --hold 1500 > b.out &
    nbd_interleave.py NS ROUNDS a.out PID_A b.out PID_B [CLIENTS] [GIB_PER_CLIENT]

Server CPU: the bench process's threads' run time (/proc/PID/task/*/schedstat, in ns; a
held server's threads live as long as it does); nbdkit's from /proc/PID/stat (10 ms
ticks). Clients' CPU: this script's children (RUSAGE_CHILDREN). Per GiB delivered.
"""
import glob, os, resource, statistics as st, subprocess, sys, time

ns, rounds = sys.argv[1], int(sys.argv[2])
builds = {"a": (sys.argv[3], sys.argv[4]), "b": (sys.argv[5], sys.argv[6])}
clients = int(sys.argv[7]) if len(sys.argv) > 7 else 1
gib = clients * (float(sys.argv[8]) if len(sys.argv) > 8 else 1.0)

uris = {}
for b, (out, _) in builds.items():
    for line in open(out):
        key, *_, uri = line.split()
        uris[(b, key)] = uri


def run_time(pid):
    total = 0
    for t in glob.glob(f"/proc/{pid}/task/*/schedstat"):
        try:
            total += int(open(t).read().split()[0])
        except OSError:
            pass
    return total / 1e9


def tick_time(pid):
    f = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(f[11]) + int(f[12])) / os.sysconf("SC_CLK_TCK")


def children_cpu():
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


kit = None
if ("b", "nbdkit") in uris:
    kit = subprocess.run(["pgrep", "-P", builds["b"][1], "nbdkit"], capture_output=True, text=True).stdout.split()[0]

results = {}
for r in range(rounds):
    order = [("a", "plain"), ("b", "plain"), ("a", "half"), ("b", "half")]
    if r % 2:
        order = [("b" if b == "a" else "a", k) for b, k in order]
    if kit:
        order.append(("b", "nbdkit"))
    for b, k in order:
        cpu = (lambda: tick_time(kit)) if k == "nbdkit" else (lambda: run_time(builds[b][1]))
        c0, k0, t0 = cpu(), children_cpu(), time.time()
        procs = [subprocess.Popen(["ip", "netns", "exec", ns, "nbdcopy", uris[(b, k)], "null:"]) for _ in range(clients)]
        for p in procs:
            assert p.wait() == 0, f"nbdcopy {uris[(b, k)]} failed"
        load = float(open("/proc/loadavg").read().split()[0])
        results.setdefault((b, k), []).append((time.time() - t0, cpu() - c0, children_cpu() - k0, load))

for (b, k), v in sorted(results.items()):
    t = [x[0] for x in v]
    c = [x[1] / gib for x in v]
    q = st.quantiles(c, n=4)
    print(f"{b} {k:6} n={len(v)} median {st.median(t):.3f} s ({gib * 1073.741824 / st.median(t):.0f} MB/s)  "
          f"server CPU {st.median(c):.4f} s/GiB (q1-q3 {q[0]:.4f}-{q[2]:.4f})  "
          f"clients {st.median(x[2] / gib for x in v):.3f} s/GiB  load {min(x[3] for x in v):.1f}-{max(x[3] for x in v):.1f}")
for b in builds:
    plain, half = results[(b, "plain")], results[(b, "half")]
    thr = [p[0] / h[0] for p, h in zip(plain, half)]
    cpu = [h[1] / p[1] for p, h in zip(plain, half)]
    q = st.quantiles(thr, n=4)
    print(f"{b}: 50 % overlay ÷ plain, throughput per round: median {st.median(thr):.3f} (q1-q3 {q[0]:.3f}-{q[2]:.3f}); server CPU {st.median(cpu):.3f}")
    if kit:
        kits = results[("b", "nbdkit")]
        print(f"{b}: plain ÷ nbdkit throughput per round: median {st.median(k[0] / p[0] for p, k in zip(plain, kits)):.3f}")
