#!/usr/bin/env python3
"""Debian i386 Linux on popek's engines side by side with QEMU TCG.

Same kernel, initramfs and /init (scripts/bench/init-bench.sh) everywhere.
The host timestamps the serial console: process start -> /init marker,
then each workload between its START and END markers:

  sha   dd if=/dev/zero bs=1M count=160 | sha256sum
  loop  a 10^6-iteration busybox sh arithmetic loop

With --smp (scripts/bench/init-smp.sh): two `dd bs=1M count=96 | sha256sum`
jobs at once, on `bt` with one vCPU, two vCPUs in turn on one host thread
(--threads single) and two vCPUs on a thread each (--threads multi), and
on QEMU TCG with -smp 1 and -smp 2.

With --disk (scripts/bench/init-disk.sh, the virtio modules loaded):
a sequential read of 256 MiB from a virtio-blk disk (/dev/vda, a 256 MiB
image of random bytes, in the host's page cache) and a 256 MiB write to a
second one (/dev/vdb, flushed), on `bt` and on QEMU TCG with
virtio-blk-pci (modern only, cache=writeback, as popek's disks).

Usage: scripts/bench-debian.py [--engines interp,bt] [--no-qemu] [--popek BIN] [--smp] [--disk]
Prints a table and writes target/popek-bench/debian.json (smp.json, disk.json).
"""
import argparse, json, os, subprocess, sys, time, shutil

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

def guest(popek, init="init-bench.sh", flags=()):
    env = dict(os.environ, POPEK_BIN=popek)
    out = subprocess.run(["bash", os.path.join(ROOT, "scripts/debian-guest.sh"),
                          "--init", os.path.join(ROOT, "scripts/bench", init)] + list(flags),
                         env=env, check=True, capture_output=True, text=True).stdout.split()
    return out[0], out[1]

def measure(cmd, limit=900):
    t0 = time.monotonic()
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL)
    marks = {}
    buf = b""
    while True:
        chunk = p.stdout.read1(4096) if hasattr(p.stdout, "read1") else p.stdout.read(1)
        if not chunk:
            break
        buf += chunk
        while b"\n" in buf:
            line, buf = buf.split(b"\n", 1)
            s = line.decode(errors="replace").strip()
            for key in ("BENCH-INIT", "BENCH-START sha", "BENCH-END sha", "BENCH-START loop", "BENCH-END loop",
                        "BENCH-START par", "BENCH-END par", "BENCH-START read", "BENCH-END read",
                        "BENCH-START write", "BENCH-END write"):
                if s.startswith(key) and key not in marks:
                    marks[key] = time.monotonic() - t0
        if time.monotonic() - t0 > limit:
            p.kill()
            break
    p.wait()
    r = {}
    if "BENCH-INIT" in marks:
        r["init"] = marks["BENCH-INIT"]
    if "BENCH-END sha" in marks:
        r["sha"] = marks["BENCH-END sha"] - marks["BENCH-START sha"]
    if "BENCH-END loop" in marks:
        r["loop"] = marks["BENCH-END loop"] - marks["BENCH-START loop"]
    for k in ("par", "read", "write"):
        if f"BENCH-END {k}" in marks:
            r[k] = marks[f"BENCH-END {k}"] - marks[f"BENCH-START {k}"]
    return r

def disk(a):
    kernel, initrd = guest(a.popek, "init-disk.sh", ["--modules"])
    d = os.path.join(ROOT, "target/popek-bench")
    os.makedirs(d, exist_ok=True)
    src = os.path.join(d, "disk-read.img")
    if not os.path.exists(src) or os.path.getsize(src) != 256 << 20:
        with open(src, "wb") as f:
            for _ in range(256):
                f.write(os.urandom(1 << 20))
    with open(src, "rb") as f:  # into the host's page cache
        while f.read(1 << 24):
            pass
    dst = os.path.join(d, "disk-write.img")
    def fresh():
        with open(dst, "wb") as f:
            f.truncate(256 << 20)
    boot = ["--memory", "256M", "--kernel", kernel, "--initrd", initrd, "--cmdline", "console=ttyS0 quiet"]
    runs = [("bt", [a.popek, "run", "--engine", "bt", "--disk", f"path={src}", "--disk", f"path={dst}"] + boot)]
    if not a.no_qemu and shutil.which("qemu-system-i386"):
        q = ["qemu-system-i386", "-accel", "tcg", "-m", "256", "-nographic", "-no-reboot", "-net", "none",
             "-kernel", kernel, "-initrd", initrd, "-append", "console=ttyS0 quiet"]
        for i, img in enumerate((src, dst)):
            q += ["-drive", f"file={img},format=raw,if=none,id=d{i},cache=writeback",
                  "-device", f"virtio-blk-pci,drive=d{i},disable-legacy=on"]
        runs.append(("qemu-tcg", q))
    rows = {}
    for name, cmd in runs:
        fresh()
        rows[name] = measure(cmd)
    q = rows.get("qemu-tcg", {})
    print(f"{'run':<10} {'read 256 MiB (s)':>22} {'write 256 MiB (s)':>22}")
    for name, r in rows.items():
        cells = []
        for k in ("read", "write"):
            v = r.get(k)
            if v is None:
                cells.append(f"{'-':>22}")
            elif name != "qemu-tcg" and q.get(k):
                cells.append(f"{v:>6.2f} {256 / v:>6.0f} MiB/s {q[k] / v:.2f}x")
            else:
                cells.append(f"{v:>6.2f} {256 / v:>6.0f} MiB/s      ")
        print(f"{name:<10} " + " ".join(cells))
    print("(ratio = QEMU time / popek time: above 1 is faster than QEMU TCG)")
    with open(os.path.join(d, "disk.json"), "w") as f:
        json.dump(rows, f, indent=2)

def smp(a):
    kernel, initrd = guest(a.popek, "init-smp.sh")
    boot = ["--memory", "256M", "--kernel", kernel, "--initrd", initrd, "--cmdline", "console=ttyS0 quiet"]
    runs = [("bt, 1 vCPU", [a.popek, "run", "--engine", "bt", "--cpus", "1"] + boot),
            ("bt, 2 vCPUs, single", [a.popek, "run", "--engine", "bt", "--cpus", "2", "--threads", "single"] + boot),
            ("bt, 2 vCPUs, multi", [a.popek, "run", "--engine", "bt", "--cpus", "2", "--threads", "multi"] + boot)]
    if not a.no_qemu and shutil.which("qemu-system-i386"):
        q = ["qemu-system-i386", "-accel", "tcg", "-m", "256", "-nographic", "-no-reboot", "-net", "none",
             "-kernel", kernel, "-initrd", initrd, "-append", "console=ttyS0 quiet"]
        runs += [("qemu-tcg, -smp 1", q + ["-smp", "1"]), ("qemu-tcg, -smp 2", q + ["-smp", "2"])]
    rows = {name: measure(cmd) for name, cmd in runs}
    one = rows["bt, 1 vCPU"].get("par")
    print(f"{'run':<22} {'init (s)':>9} {'2 jobs (s)':>11} {'vs bt 1 vCPU':>13}")
    for name, r in rows.items():
        par = r.get("par")
        ratio = f"{one / par:.2f}x" if one and par else "-"
        init = f"{r['init']:.1f}" if "init" in r else "-"
        print(f"{name:<22} {init:>9} {par or float('nan'):>11.2f} {ratio:>13}")
    os.makedirs(os.path.join(ROOT, "target/popek-bench"), exist_ok=True)
    with open(os.path.join(ROOT, "target/popek-bench/smp.json"), "w") as f:
        json.dump(rows, f, indent=2)

def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--engines", default="interp")
    ap.add_argument("--no-qemu", action="store_true")
    ap.add_argument("--popek", default=os.path.join(ROOT, "target/release/popek"))
    ap.add_argument("--smp", action="store_true")
    ap.add_argument("--disk", action="store_true")
    a = ap.parse_args()
    if a.smp:
        return smp(a)
    if a.disk:
        return disk(a)
    kernel, initrd = guest(a.popek)
    rows = {}
    for e in a.engines.split(","):
        rows[e] = measure([a.popek, "run", "--engine", e, "--memory", "256M", "--kernel", kernel,
                           "--initrd", initrd, "--cmdline", "console=ttyS0 quiet"])
    if not a.no_qemu and shutil.which("qemu-system-i386"):
        rows["qemu-tcg"] = measure(["qemu-system-i386", "-accel", "tcg", "-m", "256", "-nographic",
                                    "-no-reboot", "-net", "none", "-kernel", kernel, "-initrd", initrd,
                                    "-append", "console=ttyS0 quiet"])
    q = rows.get("qemu-tcg", {})
    print(f"{'engine':<10} {'init (s)':>14} {'sha256 (s)':>14} {'loop (s)':>14}")
    for e, r in rows.items():
        cells = []
        for k in ("init", "sha", "loop"):
            v = r.get(k)
            if v is None:
                cells.append(f"{'-':>14}")
            elif e != "qemu-tcg" and q.get(k):
                cells.append(f"{v:>7.1f} ({q[k] / v:.2f}x)")
            else:
                cells.append(f"{v:>14.1f}")
        print(f"{e:<10} " + " ".join(cells))
    print("(ratio = QEMU time / engine time: above 1 is faster than QEMU TCG)")
    os.makedirs(os.path.join(ROOT, "target/popek-bench"), exist_ok=True)
    with open(os.path.join(ROOT, "target/popek-bench/debian.json"), "w") as f:
        json.dump(rows, f, indent=2)

if __name__ == "__main__":
    main()
