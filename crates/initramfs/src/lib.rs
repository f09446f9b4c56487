//! Linux initramfs images: the "newc" cpio format (the kernel's
//! `Documentation/driver-api/early-userspace/buffer-format.rst`), gzip
//! compressed.
//!
//! popek uses it to turn Debian's `busybox-static` into a bootable userland:
//! `/bin/busybox`, a link for each applet, the directories an init expects,
//! `/dev/console`, and an `/init` of the user's choice.

use std::io::Write;

use flate2::write::GzEncoder;
use flate2::Compression;

/// One file-system entry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Entry {
    /// A directory.
    Dir {
        /// Path without a leading slash.
        path: String,
        /// Permission bits.
        mode: u32,
    },
    /// A regular file.
    File {
        /// Path without a leading slash.
        path: String,
        /// Permission bits.
        mode: u32,
        /// Contents.
        data: Vec<u8>,
    },
    /// A symbolic link.
    Symlink {
        /// Path without a leading slash.
        path: String,
        /// Link target.
        target: String,
    },
    /// A character device node.
    CharDev {
        /// Path without a leading slash.
        path: String,
        /// Permission bits.
        mode: u32,
        /// Major number.
        major: u32,
        /// Minor number.
        minor: u32,
    },
}

/// An initramfs being assembled.
#[derive(Clone, Debug, Default)]
pub struct Initramfs {
    entries: Vec<Entry>,
}

fn pad4(out: &mut Vec<u8>) {
    while out.len() % 4 != 0 {
        out.push(0);
    }
}

fn header(
    out: &mut Vec<u8>,
    ino: u32,
    mode: u32,
    filesize: u32,
    rmajor: u32,
    rminor: u32,
    name: &str,
) {
    let fields = [
        ino,
        mode,
        0,
        0,
        1,
        0,
        filesize,
        0,
        0,
        rmajor,
        rminor,
        name.len() as u32 + 1,
        0,
    ];
    out.extend_from_slice(b"070701");
    for f in fields {
        out.extend_from_slice(format!("{f:08x}").as_bytes());
    }
    out.extend_from_slice(name.as_bytes());
    out.push(0);
    pad4(out);
}

impl Initramfs {
    /// An empty image.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds an entry.
    pub fn push(&mut self, e: Entry) -> &mut Self {
        self.entries.push(e);
        self
    }

    /// Adds a directory and its missing parents.
    pub fn dir(&mut self, path: &str) -> &mut Self {
        let mut acc = String::new();
        for part in path.trim_matches('/').split('/').filter(|p| !p.is_empty()) {
            if !acc.is_empty() {
                acc.push('/');
            }
            acc.push_str(part);
            let exists = self
                .entries
                .iter()
                .any(|e| matches!(e, Entry::Dir { path, .. } if *path == acc));
            if !exists {
                self.entries.push(Entry::Dir {
                    path: acc.clone(),
                    mode: 0o755,
                });
            }
        }
        self
    }

    /// Adds a regular file at `path` (absolute or not; no `..`), with its
    /// missing parent directories.
    pub fn file(&mut self, path: &str, mode: u32, data: Vec<u8>) -> Result<&mut Self, String> {
        let p = Self::entry_path(path)?;
        if let Some((dir, _)) = p.rsplit_once('/') {
            self.dir(dir);
        }
        Ok(self.push(Entry::File {
            path: p,
            mode,
            data,
        }))
    }

    /// Adds a symbolic link at `path` to `target`, with its missing parent
    /// directories.
    pub fn symlink(&mut self, path: &str, target: &str) -> Result<&mut Self, String> {
        let p = Self::entry_path(path)?;
        if let Some((dir, _)) = p.rsplit_once('/') {
            self.dir(dir);
        }
        Ok(self.push(Entry::Symlink {
            path: p,
            target: target.to_string(),
        }))
    }

    fn entry_path(path: &str) -> Result<String, String> {
        let p = path.trim_start_matches('/');
        if p.is_empty() || p.split('/').any(|c| c == ".." || c.is_empty()) {
            return Err(format!("{path}: not a path inside the image"));
        }
        Ok(p.to_string())
    }

    /// The uncompressed newc archive.
    pub fn to_cpio(&self) -> Vec<u8> {
        let mut out = Vec::new();
        for (i, e) in self.entries.iter().enumerate() {
            let ino = i as u32 + 1;
            match e {
                Entry::Dir { path, mode } => header(&mut out, ino, 0o040000 | mode, 0, 0, 0, path),
                Entry::File { path, mode, data } => {
                    header(
                        &mut out,
                        ino,
                        0o100000 | mode,
                        data.len() as u32,
                        0,
                        0,
                        path,
                    );
                    out.extend_from_slice(data);
                    pad4(&mut out);
                }
                Entry::Symlink { path, target } => {
                    header(&mut out, ino, 0o120777, target.len() as u32, 0, 0, path);
                    out.extend_from_slice(target.as_bytes());
                    pad4(&mut out);
                }
                Entry::CharDev {
                    path,
                    mode,
                    major,
                    minor,
                } => header(&mut out, ino, 0o020000 | mode, 0, *major, *minor, path),
            }
        }
        header(&mut out, 0, 0, 0, 0, 0, "TRAILER!!!");
        out
    }

    /// The gzip-compressed archive, as the kernel takes it.
    pub fn to_gzip(&self) -> std::io::Result<Vec<u8>> {
        let mut enc = GzEncoder::new(Vec::new(), Compression::default());
        enc.write_all(&self.to_cpio())?;
        enc.finish()
    }
}

/// The default `/init`: mounts the kernel file systems, loads the modules
/// `/lib/modules/load` lists (if any), then either makes the block device
/// `root=` names on the kernel command line the root (mounted `ro` or
/// `rw` as the command line says, then its `/sbin/init`) or prints a
/// marker and starts an interactive shell on the console.
pub const DEFAULT_INIT: &str = r#"#!/bin/sh
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev 2>/dev/null
if [ -f /lib/modules/load ]; then
  for m in $(cat /lib/modules/load); do insmod /lib/modules/$m.ko; done
fi
# root=DEVICE on the command line: mount it and make it the root.
root=; mode=ro
for a in $(cat /proc/cmdline); do
  case $a in root=/dev/*) root=${a#root=} ;; rw) mode=rw ;; ro) mode=ro ;; esac
done
if [ -n "$root" ]; then
  i=0
  while [ ! -b "$root" ] && [ $i -lt 50 ]; do sleep 0.1; i=$((i+1)); done
  mkdir -p /newroot
  if mount -o $mode "$root" /newroot && [ -x /newroot/sbin/init ]; then
    echo "popek: root $root ($mode)"
    umount /proc /sys /dev 2>/dev/null
    exec switch_root /newroot /sbin/init
  fi
  echo "popek: cannot mount $root with an /sbin/init; staying in the initramfs"
fi
echo 'popek: init reached'
echo 'Debian busybox shell; poweroff -f to power off'
exec setsid cttyhack sh
"#;

/// A busybox initramfs: `/bin/busybox`, one symlink per applet (each entry
/// of `applets` is a full path like `/usr/bin/awk`), the usual directories,
/// `/dev/console` and `/dev/null`, and `init` as `/init`.
pub fn busybox_image(busybox: &[u8], applets: &[String], init: &[u8]) -> Initramfs {
    let mut img = Initramfs::new();
    for d in [
        "bin", "sbin", "usr/bin", "usr/sbin", "proc", "sys", "dev", "tmp", "root", "etc", "mnt",
    ] {
        img.dir(d);
    }
    img.push(Entry::CharDev {
        path: "dev/console".into(),
        mode: 0o600,
        major: 5,
        minor: 1,
    });
    img.push(Entry::CharDev {
        path: "dev/null".into(),
        mode: 0o666,
        major: 1,
        minor: 3,
    });
    img.push(Entry::File {
        path: "bin/busybox".into(),
        mode: 0o755,
        data: busybox.to_vec(),
    });
    for a in applets {
        let p = a.trim_start_matches('/');
        if p.is_empty() || p == "bin/busybox" || p.contains("..") {
            continue;
        }
        if let Some((dir, _)) = p.rsplit_once('/') {
            img.dir(dir);
        }
        img.push(Entry::Symlink {
            path: p.to_string(),
            target: "/bin/busybox".into(),
        });
    }
    img.push(Entry::File {
        path: "init".into(),
        mode: 0o755,
        data: init.to_vec(),
    });
    img
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn newc_layout_is_exact() {
        let mut img = Initramfs::new();
        img.push(Entry::File {
            path: "init".into(),
            mode: 0o755,
            data: b"hello".to_vec(),
        });
        let c = img.to_cpio();
        assert_eq!(&c[..6], b"070701");
        // mode field (second) = 0100755
        assert_eq!(&c[14..22], b"000081ed");
        // filesize field (seventh)
        assert_eq!(&c[6 + 8 * 6..6 + 8 * 7], b"00000005");
        // name "init\0" at 110, padded to 116, then data.
        assert_eq!(&c[110..115], b"init\0");
        assert_eq!(&c[116..121], b"hello");
        assert_eq!(c.len() % 4, 0);
        let trailer = c.windows(10).position(|w| w == b"TRAILER!!!");
        assert!(trailer.is_some());
    }

    #[test]
    fn busybox_image_has_links_and_init() {
        let img = busybox_image(
            b"\x7fELF",
            &["/bin/sh".into(), "/usr/bin/awk".into()],
            b"#!/bin/sh\n",
        );
        let c = img.to_cpio();
        let has = |s: &[u8]| c.windows(s.len()).any(|w| w == s);
        assert!(has(b"bin/sh\0"));
        assert!(has(b"usr/bin/awk\0"));
        assert!(has(b"dev/console\0"));
        assert!(has(b"init\0"));
        let gz = img.to_gzip().unwrap();
        assert_eq!(&gz[..2], &[0x1f, 0x8b]);
    }

    #[test]
    fn added_files_and_links_get_their_directories_and_stay_inside() {
        let mut img = Initramfs::new();
        img.file("/lib/i386-linux-gnu/libc.so.6", 0o755, b"x".to_vec())
            .unwrap();
        img.symlink("/usr/bin/lspci", "/bin/toybox").unwrap();
        let has = |p: &str| {
            img.entries.iter().any(|e| match e {
                Entry::Dir { path, .. }
                | Entry::File { path, .. }
                | Entry::Symlink { path, .. } => path == p,
                _ => false,
            })
        };
        for p in [
            "lib",
            "lib/i386-linux-gnu",
            "lib/i386-linux-gnu/libc.so.6",
            "usr/bin/lspci",
        ] {
            assert!(has(p), "{p}");
        }
        for bad in ["../etc/passwd", "/a/../../b", "/", "a//b"] {
            assert!(img.file(bad, 0o644, Vec::new()).is_err(), "{bad}");
        }
    }

    #[test]
    fn dir_adds_parents_once() {
        let mut img = Initramfs::new();
        img.dir("a/b/c").dir("a/b/d");
        let dirs = img
            .entries
            .iter()
            .filter(|e| matches!(e, Entry::Dir { .. }))
            .count();
        assert_eq!(dirs, 4);
    }
}
