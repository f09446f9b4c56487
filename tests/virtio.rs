//! virtio devices under Debian's stock i386 kernel on `bt`: a virtio-blk
//! disk with an ext4 file system that keeps what the guest wrote across
//! boots (and an fsynced write across popek being killed), a read-only
//! disk, and virtio-rng. The kernel finds the devices on PCI, places their
//! BARs and enables MSI-X itself. The guest comes from Debian's archive
//! through `scripts/debian-guest.sh --modules --lspci` (cached).

mod support;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use support::Popek;

/// The kernel and the initramfs whose /init is tests/debian/init-disk.sh.
fn guest() -> (PathBuf, PathBuf) {
    support::debian_guest("init-disk.sh", &["--modules", "--lspci"])
}

/// A 64 MiB image with an empty ext4 file system (host `mkfs.ext4`).
fn ext4_image(name: &str) -> PathBuf {
    let p = std::env::temp_dir().join(format!("popek-{name}-{}.img", std::process::id()));
    let _ = std::fs::remove_file(&p);
    std::fs::File::create(&p)
        .and_then(|f| f.set_len(64 << 20))
        .expect("an image file");
    let st = Command::new("mkfs.ext4")
        .args(["-q", "-F", "-L", "popek"])
        .arg(&p)
        .status()
        .expect("mkfs.ext4 runs (Debian package e2fsprogs; scripts/test.sh installs it)");
    assert!(st.success(), "mkfs.ext4 failed");
    p
}

/// Starts Debian on bt with `disk` as /dev/vda (`disk_opts` appended to
/// its --disk value) and virtio-rng, in `mode` (see init-disk.sh).
fn start(disk: &Path, disk_opts: &str, mode: &str) -> Popek {
    let disk_arg = format!("path={}{disk_opts}", disk.display());
    start_with(mode, &["--disk", &disk_arg, "--rng"])
}

/// Starts Debian on bt in `mode` with `extra` arguments for `popek run`.
fn start_with(mode: &str, extra: &[&str]) -> Popek {
    let (kernel, initrd) = guest();
    let cmdline = format!("console=ttyS0 quiet popek.mode={mode}");
    let mut args = vec![
        "run",
        "--engine",
        "bt",
        "--memory",
        "256M",
        "--kernel",
        kernel.to_str().unwrap(),
        "--initrd",
        initrd.to_str().unwrap(),
        "--cmdline",
        &cmdline,
    ];
    args.extend_from_slice(extra);
    Popek::start(&args)
}

/// The value after `key` on the console (to the end of its line).
fn value<'a>(out: &'a str, key: &str) -> &'a str {
    out.lines()
        .find_map(|l| l.strip_prefix(key))
        .unwrap_or_else(|| panic!("no {key:?} on the console:\n{out}"))
        .trim()
}

/// sha256 of a file inside the image (host `debugfs`).
fn sha_in_image(img: &Path, file: &str) -> String {
    let out = Command::new("debugfs")
        .args(["-R", &format!("dump {file} /dev/stdout")])
        .arg(img)
        .stderr(Stdio::null())
        .output()
        .expect("debugfs runs (e2fsprogs)");
    sha256(&out.stdout)
}

fn sha256(data: &[u8]) -> String {
    let mut child = Command::new("sha256sum")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("sha256sum runs");
    use std::io::Write;
    child.stdin.take().unwrap().write_all(data).unwrap();
    let out = child.wait_with_output().unwrap();
    String::from_utf8_lossy(&out.stdout)[..64].to_string()
}

/// `e2fsck` on the image: its exit status (0: clean; with `fix`, 1:
/// fixed, e.g. a journal replayed).
fn fsck(img: &Path, fix: bool) -> i32 {
    Command::new("e2fsck")
        .args(if fix { ["-f", "-y"] } else { ["-f", "-n"] })
        .arg(img)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .expect("e2fsck runs (e2fsprogs)")
        .code()
        .unwrap_or(-1)
}

#[test]
fn debian_keeps_a_file_on_a_virtio_disk_across_boots() {
    let img = ext4_image("keep");
    let (st, out, err) = start(&img, "", "write").finish_within(300);
    assert_eq!(st, 0, "powered off:\n{out}\nstderr:\n{err}");
    assert!(
        out.contains("POPEK-DONE") && out.contains("unmounted"),
        "{out}"
    );
    // What the kernel found: the disk (64 MiB, its serial the file name),
    // both functions on PCI with MSI-X on and the BARs it placed itself.
    assert_eq!(value(&out, "vda sectors:"), "131072");
    let name = img.file_name().unwrap().to_string_lossy();
    assert_eq!(value(&out, "vda serial:"), &name[..name.len().min(20)]);
    assert!(value(&out, "hwrng:").starts_with("virtio_rng"), "{out}");
    assert_eq!(value(&out, "hwrng bytes:"), "4096");
    let lspci: Vec<&str> = out.lines().filter(|l| l.starts_with("lspci: ")).collect();
    assert!(
        lspci.iter().any(|l| l.contains("Virtio 1.0 block device"))
            && lspci.iter().any(|l| l.contains("Virtio 1.0 RNG")),
        "{lspci:#?}"
    );
    assert_eq!(
        lspci
            .iter()
            .filter(|l| l.contains("MSI-X: Enable+"))
            .count(),
        2,
        "{lspci:#?}"
    );
    assert!(
        out.contains("dmesg: ") && out.contains("assigned"),
        "Linux placed the BARs:\n{out}"
    );
    let blk_irqs: u64 = out
        .lines()
        .filter_map(|l| l.strip_prefix("irq: "))
        .filter(|l| l.starts_with("virtio0-req"))
        .filter_map(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
        .sum();
    assert!(
        blk_irqs > 0,
        "the disk's queue interrupted through MSI-X:\n{out}"
    );
    let sha = value(&out, "data sha:").to_string();
    assert_eq!(sha.len(), 64);
    // On the host: the file system is clean and holds the file.
    assert_eq!(fsck(&img, false), 0, "e2fsck -fn found errors");
    assert_eq!(sha_in_image(&img, "/data"), sha);
    // Booted again from the same image: the file is there.
    let (st, out, err) = start(&img, "", "check").finish_within(300);
    assert_eq!(st, 0, "powered off:\n{out}\nstderr:\n{err}");
    assert_eq!(value(&out, "data sha:"), sha, "{out}");
    assert_eq!(fsck(&img, false), 0);
    let _ = std::fs::remove_file(&img);
}

#[test]
fn an_fsynced_write_survives_popek_being_killed() {
    let img = ext4_image("fsync");
    let p = start(&img, "", "fsync");
    p.wait_for_within("POPEK-FSYNCED", 300);
    let out = p.out();
    p.kill();
    let sha = value(&out, "synced sha:").to_string();
    // The journal holds the write: e2fsck replays it (status 0 or 1).
    let fixed = fsck(&img, true);
    assert!(fixed == 0 || fixed == 1, "e2fsck -fy: {fixed}");
    assert_eq!(sha_in_image(&img, "/synced"), sha, "{out}");
    let _ = std::fs::remove_file(&img);
}

#[test]
fn a_read_only_disk_refuses_the_guests_writes() {
    let img = ext4_image("ro");
    let before = sha256(&std::fs::read(&img).unwrap());
    let (st, out, err) = start(&img, ",readonly=on", "ro").finish_within(300);
    assert_eq!(st, 0, "powered off:\n{out}\nstderr:\n{err}");
    assert_eq!(value(&out, "ro write:"), "refused", "{out}");
    assert_eq!(sha256(&std::fs::read(&img).unwrap()), before);
    let _ = std::fs::remove_file(&img);
}

#[test]
fn a_vm_with_a_disk_is_snapshotted_and_goes_on_from_the_snapshot_under_interp() {
    let img = ext4_image("snap");
    let dir = std::env::temp_dir().join(format!("popek-virtio-snap-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let sock = dir.join("api.sock");
    let snap = dir.join("vm.snap");
    let disk_arg = format!("path={}", img.display());
    let vm = start_with(
        "shell",
        &[
            "--disk",
            &disk_arg,
            "--rng",
            "--api-sock",
            sock.to_str().unwrap(),
        ],
    );
    vm.wait_for_within("POPEK-SNAP-READY", 300);
    std::thread::sleep(std::time::Duration::from_millis(500));
    support::snapshot_and_stop(&sock, &snap, vm);
    // The state names the devices and where the disk is.
    let state = std::fs::read_to_string(&snap).unwrap();
    assert!(state.contains("virtio-blk") && state.contains("virtio-rng"));
    // Restored (from another directory) on another engine: the driver's
    // rings and the disk go on.
    let mut r = Popek::start(&["restore", snap.to_str().unwrap(), "--engine", "interp"]);
    r.type_line(
        // (The terminal echoes the line: the markers are split in it.)
        "head -c 65536 /dev/hwrng > /mnt/after && echo \"after \"\"sha: $(sha256sum /mnt/after | cut -c1-64)\"; cat /mnt/before; umount /mnt && echo \"UN\"\"MOUNTED\"",
    );
    r.wait_for_within("UNMOUNTED", 300);
    let out = r.out();
    assert!(out.contains("before"), "{out}");
    let sha = value(&out, "after sha:").to_string();
    r.type_line("poweroff -f");
    let (st, out, err) = r.finish_within(120);
    assert_eq!(st, 0, "{err}\n{out}");
    assert_eq!(fsck(&img, false), 0, "e2fsck -fn found errors");
    assert_eq!(sha_in_image(&img, "/after"), sha);
    let _ = std::fs::remove_file(&img);
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn a_snapshot_whose_disk_changed_size_is_refused() {
    let img = ext4_image("resized");
    let dir = std::env::temp_dir().join(format!("popek-virtio-resize-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let sock = dir.join("api.sock");
    let snap = dir.join("vm.snap");
    let disk_arg = format!("path={}", img.display());
    // minios is enough: the disk only has to be there.
    let vm = Popek::start(&[
        "run",
        "--engine",
        "bt",
        "--disk",
        &disk_arg,
        "--api-sock",
        sock.to_str().unwrap(),
    ]);
    vm.wait_for_within("minios", 30);
    support::snapshot_and_stop(&sock, &snap, vm);
    std::fs::File::options()
        .write(true)
        .open(&img)
        .unwrap()
        .set_len(32 << 20)
        .unwrap();
    let (st, _, err) = support::popek(&["restore", snap.to_str().unwrap()]);
    assert_eq!(st, 2, "{err}");
    assert!(
        err.contains("65536 sectors") && err.contains("131072"),
        "{err}"
    );
    let _ = std::fs::remove_file(&img);
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn a_virtio_console_is_the_terminal_when_asked() {
    let mut p = start_with("hvc", &["--serial", "off", "--console", "tty"]);
    p.wait_for_within("POPEK-HVC hello from hvc0", 300);
    p.type_line("ping-through-hvc0");
    p.wait_for_within("POPEK-HVC got: ping-through-hvc0", 60);
    let (st, out, err) = p.finish_within(120);
    assert_eq!(st, 0, "{err}\n{out}");
    assert!(
        !out.contains("POPEK-DISK") && !out.contains("Linux version"),
        "COM1 is off: only hvc0 reaches the terminal:\n{out}"
    );
}

#[test]
fn debian_boots_from_a_root_file_system_on_a_virtio_disk() {
    // The default /init loads the modules and switches to root=.
    let files = support::debian_files(&["--rootfs"]);
    let (kernel, initrd, image) = (&files[0], &files[1], &files[2]);
    let img = std::env::temp_dir().join(format!("popek-rootfs-{}.img", std::process::id()));
    std::fs::copy(image, &img).expect("a copy of the root image");
    let disk_arg = format!("path={}", img.display());
    let mut p = Popek::start(&[
        "run",
        "--engine",
        "bt",
        "--kernel",
        kernel.to_str().unwrap(),
        "--initrd",
        initrd.to_str().unwrap(),
        "--cmdline",
        "console=ttyS0 quiet root=/dev/vda rw",
        "--disk",
        &disk_arg,
    ]);
    p.wait_for_within("popek: init on the disk reached (/dev/vda)", 300);
    p.type_line("echo persisted > /root/mark; sync; poweroff -f");
    let (st, out, err) = p.finish_within(120);
    assert_eq!(st, 0, "{err}\n{out}");
    assert!(out.contains("popek: root /dev/vda (rw)"), "{out}");
    assert_eq!(fsck(&img, false), 0, "e2fsck -fn found errors");
    let got = Command::new("debugfs")
        .args(["-R", "cat /root/mark"])
        .arg(&img)
        .stderr(Stdio::null())
        .output()
        .expect("debugfs runs");
    assert_eq!(String::from_utf8_lossy(&got.stdout).trim(), "persisted");
    let _ = std::fs::remove_file(&img);
}

/// A TAP device made for a test (deleted when dropped), with the host's
/// address on it; `None` (and why) where TAPs cannot be made here.
struct TestTap(String);

impl TestTap {
    fn new(host_cidr: &str) -> Result<TestTap, String> {
        if !Path::new("/dev/net/tun").exists() {
            return Err("/dev/net/tun is absent".into());
        }
        let name = format!("popek{}", std::process::id() % 100_000);
        let ip = |args: &[&str]| {
            Command::new("ip")
                .args(args)
                .status()
                .map_err(|e| format!("ip {args:?}: {e} (iproute2)"))
                .and_then(|s| {
                    s.success()
                        .then_some(())
                        .ok_or(format!("ip {args:?} failed (not root?)"))
                })
        };
        ip(&["tuntap", "add", "dev", &name, "mode", "tap"])?;
        let tap = TestTap(name);
        ip(&["addr", "add", host_cidr, "dev", &tap.0])?;
        ip(&["link", "set", &tap.0, "up"])?;
        Ok(tap)
    }
}

impl Drop for TestTap {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["link", "del", &self.0]).status();
    }
}

#[test]
fn the_guest_serves_a_file_over_virtio_net_and_the_host_fetches_it() {
    let sub = std::process::id() % 250 + 1;
    let tap = match TestTap::new(&format!("10.77.{sub}.1/24")) {
        Ok(t) => t,
        Err(why) => {
            println!("SKIPPED: no TAP device can be made here: {why}");
            return;
        }
    };
    let guest_ip = format!("10.77.{sub}.2");
    let net = format!("tap={},mac=52:54:00:12:34:56", tap.0);
    let p = start_with(
        &format!("net popek.ip={guest_ip}/24"),
        &["--net", &net, "--rng"],
    );
    p.wait_for_within("POPEK-NET-READY", 300);
    let out = p.out();
    assert_eq!(value(&out, "eth0 mac:"), "52:54:00:12:34:56");
    let sha = value(&out, "net sha:").to_string();
    let got = Command::new("curl")
        .args(["-s", "-m", "30", &format!("http://{guest_ip}/data")])
        .output()
        .expect("curl runs");
    assert!(got.status.success(), "curl: {:?}", got.status);
    assert_eq!(got.stdout.len(), 1 << 20);
    assert_eq!(sha256(&got.stdout), sha);
    p.kill();
}
