//! Builds minios (guests/minios) with the host toolchain into OUT_DIR.

use std::env;
use std::path::PathBuf;
use std::process::Command;

/// The flavours built here, in the order of `popek_guests::NAMES`.
const FLAVOURS: &[&str] = &["minios", "minios-pv", "minios64", "minios64-pv"];

fn tool_works(tool: &str) -> bool {
    Command::new(tool)
        .arg("--version")
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false)
}

fn main() {
    let manifest = PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").expect("CARGO_MANIFEST_DIR"));
    let src = manifest.join("../../guests/minios");
    let out = PathBuf::from(env::var_os("OUT_DIR").expect("OUT_DIR"));
    println!("cargo:rerun-if-changed={}", src.display());
    println!("cargo:rerun-if-env-changed=CC");
    println!("cargo:rerun-if-env-changed=LD");
    println!("cargo:rerun-if-env-changed=OBJCOPY");

    let cc = env::var("CC").unwrap_or_else(|_| "gcc".into());
    let ld = env::var("LD").unwrap_or_else(|_| "ld".into());
    let objcopy = env::var("OBJCOPY").unwrap_or_else(|_| "objcopy".into());
    for tool in [&cc, &ld, &objcopy] {
        if !tool_works(tool) {
            panic!(
                "building the minios guest needs the host C compiler, linker and objcopy, but \
                 `{tool}` does not run; install them with `apt-get install gcc binutils` (Debian \
                 packages `gcc` and `binutils`)"
            );
        }
    }

    let status = Command::new("sh")
        .arg(src.join("build.sh"))
        .arg(&out)
        .args(FLAVOURS)
        .env("CC", &cc)
        .env("LD", &ld)
        .env("OBJCOPY", &objcopy)
        .status()
        .expect("cannot run sh for guests/minios/build.sh");
    if !status.success() {
        panic!(
            "guests/minios/build.sh failed ({status}); it needs gcc able to emit 32- and 64-bit \
             code (`gcc -m32 -ffreestanding`), GNU ld and objcopy (Debian packages `gcc` and \
             `binutils`)"
        );
    }
}
