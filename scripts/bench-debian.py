#!/usr/bin/env python3
"""Debian i386 Linux on popek's engines side by side with QEMU TCG.

Same kernel, initramfs and /init (scripts/bench/init-bench.sh) everywhere.
The host timestamps the serial console: process start -> /init marker,
then each workload between its START and END markers:

  sha   dd if=/dev/zero bs=1M count=160 | sha256sum
  loop  a 10^6-iteration busybox sh arithmetic loop

Usage: scripts/bench-debian.py [--engines interp,bt] [--no-qemu] [--popek BIN]
Prints a table and writes target/popek-bench/debian.json.
"""
import argparse, json, os, subprocess, sys, time, shutil

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

def guest(popek):
    env = dict(os.environ, POPEK_BIN=popek)
    out = subprocess.run(["bash", os.path.join(ROOT, "scripts/debian-guest.sh"),
                          "--init", os.path.join(ROOT, "scripts/bench/init-bench.sh")],
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
            for key in ("BENCH-INIT", "BENCH-START sha", "BENCH-END sha", "BENCH-START loop", "BENCH-END loop"):
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
    return r

def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--engines", default="interp")
    ap.add_argument("--no-qemu", action="store_true")
    ap.add_argument("--popek", default=os.path.join(ROOT, "target/release/popek"))
    a = ap.parse_args()
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
