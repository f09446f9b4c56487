//! `popek`: the command-line front end.
//!
//! `popek run` boots a guest (by default the embedded minios) on an engine;
//! the serial console is the terminal. Exit statuses (`docs/architecture.md`):
//! 0 power-off/reset, odd for the debug-exit port, 2 bad input, 4 the guest
//! died, 6 no progress.

mod api;
mod bench;
mod console;

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand, ValueEnum};
use popek_machine::ClockMode;
use popek_vmm::{EngineKind, FileFormat, KernelSource, Outcome, Vm, VmConfig};

#[derive(Parser)]
#[command(
    name = "popek",
    version,
    about = "A hypervisor for x86 guests: hardware-assisted (KVM), binary translation, trap-and-emulate and a reference software CPU",
    after_help = "With no command, `popek` is `popek run`: it boots the embedded minios guest on the best engine.\n\
                  Exit status: 0 guest powered off or reset; (v<<1)|1 guest wrote v to port 0xf4; 2 bad input; 4 guest died; 6 no progress."
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Boot a guest with its serial console on this terminal (Ctrl-A x
    /// quits, Ctrl-A s writes a snapshot).
    Run(RunArgs),
    /// Run minios's micro-benchmarks on every engine: one table, plus JSON and SVG.
    Bench(BenchArgs),
    /// List the guests built into popek.
    Guests,
    /// Show what this host offers: the KVM and what it can run (probed by
    /// booting tiny guests; cached per boot).
    Info(InfoArgs),
    /// Build a busybox initramfs (newc cpio, gzip) for a Linux guest.
    Initramfs(InitramfsArgs),
    /// Run a guest under the trap engine and print the x86-gap audit: every
    /// sensitive but unprivileged instruction it ran deprivileged, how often
    /// the result differed from ring 0, and what that did.
    Audit(AuditArgs),
    /// Snapshot a running VM through its API socket: pause, write the state
    /// file FILE and its memory file FILE.mem, resume (or end it).
    Snapshot(SnapshotArgs),
    /// Continue a VM from a snapshot, on its engine or another one.
    Restore(RestoreArgs),
}

#[derive(Args, Clone)]
struct SnapshotArgs {
    /// The API socket of the VM (`popek run --api-sock PATH`).
    #[arg(long, value_name = "PATH")]
    api_sock: PathBuf,
    /// The state file to write; the memory file is FILE.mem beside it.
    #[arg(long, short = 'o', value_name = "FILE")]
    output: PathBuf,
    /// Write only the pages that changed since the VM's last snapshot (a
    /// diff snapshot; restoring it needs its parent).
    #[arg(long)]
    diff: bool,
    /// End the VM after the snapshot instead of resuming it.
    #[arg(long)]
    stop: bool,
}

fn snapshot_cmd(a: SnapshotArgs) -> u8 {
    use popek_api::client::request;
    let abs = |p: &std::path::Path| std::path::absolute(p).unwrap_or_else(|_| p.to_path_buf());
    let state = abs(&a.output);
    let mem = popek_vmm::snapshot::mem_path_for(&state);
    let step = |method: &str, path: &str, body: serde_json::Value| -> Result<String, String> {
        let r = request(&a.api_sock, method, path, Some(&body))?;
        if r.ok() {
            Ok(r.body)
        } else {
            Err(format!("{method} {path}: {} {}", r.status, r.message()))
        }
    };
    let result = step("PATCH", "/vm", serde_json::json!({"state": "Paused"})).and_then(|_| {
        let made = step(
            "PUT",
            "/snapshot/create",
            serde_json::json!({
                "snapshot_type": if a.diff { "Diff" } else { "Full" },
                "snapshot_path": state,
                "mem_file_path": mem,
            }),
        );
        // Resume (or end) whether or not the snapshot worked.
        let after = if a.stop {
            step(
                "PUT",
                "/actions",
                serde_json::json!({"action_type": "Stop"}),
            )
        } else {
            step("PATCH", "/vm", serde_json::json!({"state": "Resumed"}))
        };
        let made = made?;
        after?;
        Ok(made)
    });
    match result {
        Ok(body) => {
            let v: serde_json::Value = serde_json::from_str(&body).unwrap_or_default();
            eprintln!(
                "popek: wrote {} and {} ({} pages, {:.1} ms){}",
                state.display(),
                mem.display(),
                v["pages"],
                v["took_ms"].as_f64().unwrap_or(0.0),
                if a.stop { "; the VM ended" } else { "" }
            );
            0
        }
        Err(e) => {
            eprintln!("popek: snapshot: {e}");
            2
        }
    }
}

#[derive(Args, Clone)]
struct RestoreArgs {
    /// The state file (its memory file is found through it).
    file: PathBuf,
    /// Engine to continue on (default: the one that took the snapshot,
    /// when it is here and runs the vCPU's mode).
    #[arg(long, value_enum)]
    engine: Option<EngineArg>,
    /// Map the memory file copy-on-write, sharing unchanged pages with
    /// every other VM restored from it (the file must then stay as it is).
    #[arg(long)]
    clone: bool,
    #[command(flatten)]
    session: Session,
}

fn restore(a: RestoreArgs) -> u8 {
    let opts = popek_vmm::RestoreOptions {
        engine: a.engine.and_then(engine_kind),
        clone: a.clone,
    };
    let api = match api::start(&a.session) {
        Ok(api) => api,
        Err(code) => return code,
    };
    let vm = match Vm::restore(&a.file, &opts, Box::new(std::io::stdout())) {
        Ok(vm) => vm,
        Err(e) => {
            eprintln!("popek: {}", e.chain());
            return 2;
        }
    };
    eprintln!(
        "popek: restored {} on engine {}",
        a.file.display(),
        vm.engine_kind().name()
    );
    drive(vm, &a.session, api)
}

#[derive(Args, Clone)]
struct AuditArgs {
    #[command(flatten)]
    vm: RunArgs,
    /// Print the report as JSON on stdout (the guest's console goes to
    /// stderr).
    #[arg(long)]
    json: bool,
}

fn audit(a: AuditArgs) -> u8 {
    let mut r = a.vm;
    if !matches!(r.engine, EngineArg::Auto | EngineArg::Trap) {
        eprintln!("popek: audit runs the guest under --engine trap only");
        return 2;
    }
    r.engine = EngineArg::Trap;
    let console: Box<dyn Write + Send> = if a.json {
        Box::new(std::io::stderr())
    } else {
        Box::new(std::io::stdout())
    };
    let mut vm = match make_vm(&r, console) {
        Ok(vm) => vm,
        Err(code) => return code,
    };
    if let Some(i) = vm.engine.inspect() {
        i.set_trace_traps(r.session.trace.is_some());
    }
    let outcome = vm.run();
    let _ = std::io::stdout().flush();
    let status = outcome.exit_status();
    let ending = match &outcome {
        Outcome::Died(t) | Outcome::NoProgress(t) | Outcome::Unsupported(t) => t.clone(),
        Outcome::PowerOff => "the guest powered off".into(),
        Outcome::Reset => "the guest reset the machine".into(),
        Outcome::DebugExit(v) => format!("the guest wrote {v} to the debug-exit port"),
        Outcome::Quit => "quit from the console".into(),
        Outcome::Ended(why) => format!("the VM ended: {why}"),
        Outcome::Stopped(n) => format!("stopped after {n} instructions"),
    };
    let rows = vm
        .engine
        .inspect()
        .and_then(|i| i.audit())
        .unwrap_or_default();
    let stats = vm.stats();
    if a.json {
        let rows_json: Vec<serde_json::Value> = rows
            .iter()
            .map(|r| {
                serde_json::json!({
                    "instruction": r.instruction,
                    "count": r.count,
                    "differed": r.differed,
                    "first_address": r.first_address,
                    "first_differed_address": r.first_differed_address,
                    "consequence": r.consequence,
                })
            })
            .collect();
        let stats_json: serde_json::Map<String, serde_json::Value> = stats
            .iter()
            .map(|(k, v)| (k.clone(), serde_json::Value::from(*v)))
            .collect();
        let doc = serde_json::json!({
            "engine": "trap",
            "guest_exit_status": status,
            "guest_ending": ending,
            "instructions": rows_json,
            "stats": stats_json,
        });
        println!("{}", serde_json::to_string_pretty(&doc).unwrap_or_default());
        return 0;
    }
    println!();
    println!("popek audit: the guest ended with status {status}");
    for l in ending.lines() {
        println!("  {l}");
    }
    println!();
    println!(
        "{:<30} {:>9} {:>9}  {:<10}  consequence",
        "instruction", "count", "differed", "first at"
    );
    for r in &rows {
        println!(
            "{:<30} {:>9} {:>9}  {:#010x}  {}",
            r.instruction, r.count, r.differed, r.first_address, r.consequence
        );
    }
    if rows.is_empty() {
        println!("(no gap instruction ran deprivileged)");
    }
    println!();
    for (k, v) in &stats {
        println!("  {k:<40} {v}");
    }
    0
}

#[derive(Args, Clone)]
struct InfoArgs {
    /// Probe again instead of using the per-boot cache.
    #[arg(long)]
    reprobe: bool,
}

fn info(a: InfoArgs) -> u8 {
    let caps = if a.reprobe {
        popek_hw::probe::probe_now()
    } else {
        popek_hw::probe()
    };
    print!("{}", caps.report());
    println!("  cache: {}", popek_hw::probe::cache_path().display());
    let (e, why) = EngineKind::auto_for(&KernelSource::Embedded("minios".into()));
    println!("engine auto for minios: {} ({why})", e.name());
    let (e, why) = EngineKind::auto_for(&KernelSource::Embedded("minios64".into()));
    println!("engine auto for minios64: {} ({why})", e.name());
    0
}

#[derive(Args, Clone)]
struct BenchArgs {
    /// Engines to measure, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "hw,bt,trap,interp")]
    engines: Vec<EngineArg>,
    /// Directory for bench.json and bench.svg.
    #[arg(long, value_name = "DIR", default_value = "target/popek-bench")]
    out: PathBuf,
}

fn bench(a: BenchArgs) -> u8 {
    let mut cols = Vec::new();
    for e in &a.engines {
        let kind = match e {
            EngineArg::Auto => EngineKind::auto().0,
            EngineArg::Hw => EngineKind::Hw,
            EngineArg::Bt => EngineKind::Bt,
            EngineArg::Trap => EngineKind::Trap,
            EngineArg::Interp => EngineKind::Interp,
        };
        eprintln!(
            "popek: bench: {} running {}",
            kind.name(),
            bench::guest_for(kind)
        );
        cols.push(bench::run_engine(kind));
    }
    print!("{}", bench::table(&cols));
    for c in cols.iter().filter(|c| !c.ran) {
        println!("{}: {}", c.engine, c.guest);
    }
    if let Err(e) = std::fs::create_dir_all(&a.out)
        .and_then(|_| std::fs::write(a.out.join("bench.json"), bench::json(&cols)))
        .and_then(|_| std::fs::write(a.out.join("bench.svg"), bench::svg(&cols)))
    {
        eprintln!("popek: {}: {e}", a.out.display());
        return 2;
    }
    eprintln!(
        "popek: wrote {0}/bench.json and {0}/bench.svg",
        a.out.display()
    );
    0
}

#[derive(Args, Clone)]
struct InitramfsArgs {
    /// A static busybox binary (e.g. from Debian's busybox-static).
    #[arg(long, value_name = "FILE")]
    busybox: PathBuf,
    /// The /init to put in the image (default: mount /proc, /sys, /dev and
    /// start a shell on the console).
    #[arg(long, value_name = "FILE")]
    init: Option<PathBuf>,
    /// Where to write the image.
    #[arg(long, short = 'o', value_name = "FILE")]
    output: PathBuf,
    /// Also put host file SRC at /DEST (a file a symlink names is copied);
    /// repeatable, e.g. a dynamically linked tool and its libraries.
    #[arg(long, value_name = "SRC=DEST")]
    add: Vec<String>,
    /// Also make /LINK a symlink to TARGET; repeatable.
    #[arg(long, value_name = "LINK=TARGET")]
    symlink: Vec<String>,
}

fn initramfs(a: InitramfsArgs) -> u8 {
    // An initramfs lands in guest RAM: no input can be larger than it.
    let max = popek_vmm::MAX_MEMORY;
    let busybox = match popek_vmm::read_input(&a.busybox, max) {
        Ok(b) => b,
        Err(e) => {
            eprintln!("popek: {}", e.chain());
            return 2;
        }
    };
    let init = match &a.init {
        Some(p) => match popek_vmm::read_input(p, max) {
            Ok(b) => b,
            Err(e) => {
                eprintln!("popek: {}", e.chain());
                return 2;
            }
        },
        None => popek_initramfs::DEFAULT_INIT.as_bytes().to_vec(),
    };
    // The applet list comes from the binary itself (a static i386 busybox
    // runs natively on an x86-64 host); without it, /init can still call
    // `busybox --install -s`.
    let applets: Vec<String> = std::process::Command::new(&a.busybox)
        .arg("--list-full")
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| {
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .map(|l| format!("/{}", l.trim()))
                .collect()
        })
        .unwrap_or_default();
    if applets.is_empty() {
        eprintln!(
            "popek: warning: could not list {}'s applets; only /bin/busybox is linked",
            a.busybox.display()
        );
    }
    let mut img = popek_initramfs::busybox_image(&busybox, &applets, &init);
    for (arg, is_link) in a
        .add
        .iter()
        .map(|x| (x, false))
        .chain(a.symlink.iter().map(|x| (x, true)))
    {
        let Some((left, right)) = arg.split_once('=') else {
            eprintln!(
                "popek: {arg}: expected {}",
                if is_link { "LINK=TARGET" } else { "SRC=DEST" }
            );
            return 2;
        };
        let added = if is_link {
            img.symlink(left, right)
        } else {
            match popek_vmm::read_input(std::path::Path::new(left), max) {
                Ok(data) => {
                    use std::os::unix::fs::PermissionsExt;
                    let mode = std::fs::metadata(left).map_or(0o644, |m| m.permissions().mode());
                    img.file(right, mode & 0o7777, data)
                }
                Err(e) => {
                    eprintln!("popek: {}", e.chain());
                    return 2;
                }
            }
        };
        if let Err(why) = added {
            eprintln!("popek: {arg}: {why}");
            return 2;
        }
    }
    match img.to_gzip().and_then(|gz| std::fs::write(&a.output, gz)) {
        Ok(()) => {
            eprintln!(
                "popek: wrote {} ({} applets)",
                a.output.display(),
                applets.len()
            );
            0
        }
        Err(e) => {
            eprintln!("popek: {}: {e}", a.output.display());
            2
        }
    }
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum EngineArg {
    /// Pick the best engine that can run the guest, and say why.
    Auto,
    /// Hardware-assisted virtualization through KVM.
    Hw,
    /// Binary translation into a translation cache.
    Bt,
    /// Trap-and-emulate with ring deprivileging and shadow page tables.
    Trap,
    /// The reference software CPU (full-system emulation).
    Interp,
}

#[derive(Clone, Copy, ValueEnum)]
enum TraceArg {
    /// Every trap the trap engine handles.
    Traps,
}

#[derive(Clone, Copy, ValueEnum)]
enum VendorArg {
    /// Intel processors' behaviour; CPUID says GenuineIntel.
    Intel,
    /// AMD processors' behaviour; CPUID says AuthenticAMD.
    Amd,
}

#[derive(Clone, Copy, ValueEnum)]
enum ThreadsArg {
    /// Multi under the host clock, else single.
    Auto,
    /// All vCPUs in turn on one host thread.
    Single,
    /// One host thread per vCPU (QEMU's multi-threaded TCG).
    Multi,
}

#[derive(Clone, Copy, ValueEnum)]
enum ClockArg {
    /// Timers follow the host clock (a guest `sleep 1` takes one second).
    Host,
    /// Time advances with executed instructions: reproducible runs.
    Virtual,
}

#[derive(Clone, Copy, ValueEnum)]
enum FormatArg {
    /// Detect Multiboot ELF or Linux bzImage.
    Auto,
    /// Multiboot v1 ELF kernel.
    Multiboot,
    /// Linux bzImage (x86 boot protocol, 32-bit entry).
    Linux,
    /// Flat binary entered in real mode at --load-addr.
    FlatReal,
    /// Flat binary entered in 32-bit protected mode at --load-addr.
    FlatProtected,
}

#[derive(Args, Clone)]
struct RunArgs {
    /// CPU engine.
    #[arg(long, value_enum, default_value = "auto")]
    engine: EngineArg,
    /// Kernel image (Multiboot ELF, bzImage, or flat with --format).
    #[arg(long, value_name = "FILE", conflicts_with = "guest")]
    kernel: Option<PathBuf>,
    /// Start from this firmware image (e.g. Debian's SeaBIOS,
    /// /usr/share/seabios/bios.bin) at the reset vector, as a PC does,
    /// instead of loading a kernel: the ROM sits below 4 GiB and below
    /// 1 MiB; fw_cfg tells it the machine (and hands it --kernel,
    /// --initrd and --cmdline, which it boots through QEMU's Linux option
    /// ROM from Debian's qemu-system-data).
    #[arg(long, value_name = "FILE")]
    firmware: Option<PathBuf>,
    /// Initial ramdisk (Linux) or module (Multiboot).
    #[arg(long, value_name = "FILE")]
    initrd: Option<PathBuf>,
    /// A virtio-blk disk backed by a raw image (repeatable; the guest
    /// sees /dev/vda, /dev/vdb… in this order). readonly=on refuses the
    /// guest's writes.
    #[arg(long = "disk", value_name = "path=FILE[,readonly=on]", value_parser = parse_disk)]
    disks: Vec<popek_vmm::DiskConfig>,
    /// A virtio-net interface on a host TAP device (repeatable; eth0,
    /// eth1… in the guest). popek creates the TAP when it may (root) and
    /// the name is free, or uses an existing one (ip tuntap add).
    #[arg(long = "net", value_name = "tap=NAME[,mac=MAC]", value_parser = parse_net)]
    nets: Vec<popek_vmm::NetConfig>,
    /// A virtio-rng device: the guest's /dev/hwrng, from the host's
    /// getrandom.
    #[arg(long)]
    rng: bool,
    /// Where COM1 (ttyS0) goes: tty (the terminal), off, or file=PATH.
    #[arg(long, value_name = "tty|off|file=PATH", default_value = "tty", value_parser = parse_output)]
    serial: popek_vmm::Output,
    /// A virtio console (hvc0) and where it goes: tty, file=PATH, or off
    /// (no device). Only one of --serial and --console is the terminal.
    #[arg(long, value_name = "tty|off|file=PATH", default_value = "off", value_parser = parse_output)]
    console: popek_vmm::Output,
    /// Kernel command line.
    #[arg(long, value_name = "STR", default_value = "")]
    cmdline: String,
    /// Guest RAM, e.g. 256M or 1G (2M to 3G).
    #[arg(long, short = 'm', value_name = "SIZE", default_value = "256M", value_parser = parse_size)]
    memory: u64,
    /// vCPUs (1 to 32). More than one runs on `bt` and `interp`.
    #[arg(long, value_name = "N", default_value_t = 1)]
    cpus: u32,
    /// How several vCPUs share the host: a thread each (multi), or in turn
    /// on one thread (single: reproducible with --clock virtual). Auto:
    /// multi under the host clock.
    #[arg(long, value_enum, default_value = "auto")]
    threads: ThreadsArg,
    /// Embedded guest to boot when no --kernel is given (see `popek guests`).
    #[arg(long, value_name = "NAME", default_value = "minios")]
    guest: String,
    /// Kernel file format.
    #[arg(long, value_enum, default_value = "auto")]
    format: FormatArg,
    /// Load address of a flat binary.
    #[arg(long, value_name = "ADDR", value_parser = parse_addr, default_value = "0x7c00")]
    load_addr: u64,
    /// Machine clock.
    #[arg(long, value_enum, default_value = "host")]
    clock: ClockArg,
    /// CPU vendor profile: what CPUID reports and how the results the
    /// manuals leave undefined come out, identical on every engine
    /// (default: the host's vendor; `hw` runs only the host's).
    #[arg(long, value_enum, value_name = "VENDOR")]
    cpu_vendor: Option<VendorArg>,
    /// Do not boot: wait for the API socket to configure and start the VM
    /// (`PUT /boot-source`, `PUT /machine-config`, `PUT /actions`
    /// `InstanceStart`) or load a snapshot (`PUT /snapshot/load`).
    #[arg(long, requires = "api_sock")]
    no_boot: bool,
    #[command(flatten)]
    session: Session,
}

/// What `popek run` and `popek restore` share: how the session around
/// the VM behaves.
#[derive(Args, Clone, Default)]
struct Session {
    /// Print engine statistics when the guest ends.
    #[arg(long)]
    stats: bool,
    /// Print events as they happen: `traps` (trap engine: vector, guest EIP,
    /// instruction, action) on stderr.
    #[arg(long, value_enum, value_name = "WHAT")]
    trace: Option<TraceArg>,
    /// When the guest ends, print the bt engine's translation (TU and CCF)
    /// of the guest code at this guest-physical address.
    #[arg(long, value_name = "ADDR", value_parser = parse_addr)]
    dump_ccf: Option<u64>,
    /// Stop after about N guest instructions in all (exactly N on the
    /// software engines; a restored VM counts from its snapshot), print
    /// the CPU state on stderr and exit 0: for comparing engines and
    /// studying a guest (with --clock virtual, runs repeat).
    #[arg(long, value_name = "N")]
    max_instructions: Option<u64>,
    /// Serve the control API (Firecracker's, see docs/snapshots.md) on
    /// this Unix socket.
    #[arg(long, value_name = "PATH")]
    api_sock: Option<PathBuf>,
    /// Where Ctrl-A s writes its snapshots.
    #[arg(long, value_name = "DIR", default_value = ".")]
    snapshot_dir: PathBuf,
    /// The engine that takes over, for a while, where the engine at hand
    /// cannot execute an instruction (a software KVM's emulator lacks it);
    /// the VM then returns. `--engine auto` on hw falls back to bt (or
    /// interp) by itself.
    #[arg(long, value_enum, value_name = "ENGINE")]
    fallback_engine: Option<EngineArg>,
    /// Write what the guest sends to the debug console port 0xE9 to this
    /// file (QEMU's -debugcon, Bochs's port E9 hack).
    #[arg(long, value_name = "FILE")]
    debugcon: Option<PathBuf>,
}

fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let (num, mul) = match t.chars().last().map(|c| c.to_ascii_uppercase()) {
        Some('K') => (&t[..t.len() - 1], 1u64 << 10),
        Some('M') => (&t[..t.len() - 1], 1 << 20),
        Some('G') => (&t[..t.len() - 1], 1 << 30),
        _ => (t, 1),
    };
    let n: u64 = num
        .parse()
        .map_err(|_| format!("'{s}' is not a size (e.g. 256M, 1G)"))?;
    n.checked_mul(mul)
        .ok_or_else(|| format!("'{s}' is too large"))
}

fn parse_addr(s: &str) -> Result<u64, String> {
    let r = if let Some(h) = s.strip_prefix("0x").or_else(|| s.strip_prefix("0X")) {
        u64::from_str_radix(h, 16)
    } else {
        s.parse()
    };
    r.map_err(|_| format!("'{s}' is not an address"))
}

fn parse_disk(s: &str) -> Result<popek_vmm::DiskConfig, String> {
    s.parse()
}

fn parse_net(s: &str) -> Result<popek_vmm::NetConfig, String> {
    s.parse()
}

fn parse_output(s: &str) -> Result<popek_vmm::Output, String> {
    s.parse()
}

fn default_run() -> RunArgs {
    RunArgs {
        engine: EngineArg::Auto,
        kernel: None,
        initrd: None,
        disks: Vec::new(),
        nets: Vec::new(),
        rng: false,
        serial: popek_vmm::Output::Tty,
        console: popek_vmm::Output::Off,
        cmdline: String::new(),
        memory: 256 << 20,
        cpus: 1,
        threads: ThreadsArg::Auto,
        firmware: None,
        guest: "minios".into(),
        format: FormatArg::Auto,
        load_addr: 0x7c00,
        clock: ClockArg::Host,
        cpu_vendor: None,
        no_boot: false,
        session: Session {
            snapshot_dir: PathBuf::from("."),
            ..Session::default()
        },
    }
}

/// Builds the VM `popek run` and `popek audit` describe; `Err` is the exit
/// status after the message.
fn make_vm(a: &RunArgs, console: Box<dyn Write + Send>) -> Result<Vm, u8> {
    let kernel = match a.kernel.clone() {
        Some(path) => {
            let format = match a.format {
                FormatArg::Auto => None,
                FormatArg::Multiboot => Some(FileFormat::Multiboot),
                FormatArg::Linux => Some(FileFormat::Linux),
                FormatArg::FlatReal => Some(FileFormat::FlatReal {
                    load_addr: a.load_addr,
                }),
                FormatArg::FlatProtected => Some(FileFormat::FlatProtected {
                    load_addr: a.load_addr,
                }),
            };
            KernelSource::File { path, format }
        }
        None => KernelSource::Embedded(a.guest.clone()),
    };
    let engine = engine_kind(a.engine).unwrap_or_else(|| {
        let (e, why) = EngineKind::auto_for(&kernel);
        // Several vCPUs run on the software engines only.
        let needs = (a.cpus > 1).then_some("more than one vCPU");
        match needs {
            Some(what) if matches!(e, EngineKind::Hw | EngineKind::Trap) => {
                eprintln!(
                    "popek: engine auto -> bt ({what} runs on bt and interp; {} was the choice otherwise: {why})",
                    e.name()
                );
                EngineKind::Bt
            }
            _ => {
                eprintln!("popek: engine auto -> {} ({why})", e.name());
                e
            }
        }
    });
    let cfg = VmConfig {
        memory: a.memory,
        kernel,
        initrd: a.initrd.clone(),
        cmdline: a.cmdline.clone(),
        engine,
        clock: match a.clock {
            ClockArg::Host => ClockMode::Host,
            ClockArg::Virtual => ClockMode::Virtual,
        },
        vendor: a.cpu_vendor.map(|v| match v {
            VendorArg::Intel => popek_vmm::Vendor::Intel,
            VendorArg::Amd => popek_vmm::Vendor::Amd,
        }),
        cpus: a.cpus,
        firmware: a.firmware.clone(),
        threads: match a.threads {
            ThreadsArg::Auto => popek_vmm::Threads::Auto,
            ThreadsArg::Single => popek_vmm::Threads::Single,
            ThreadsArg::Multi => popek_vmm::Threads::Multi,
        },
        devices: popek_vmm::Devices {
            disks: a.disks.clone(),
            nets: a.nets.clone(),
            rng: a.rng,
            serial: a.serial.clone(),
            console: a.console.clone(),
        },
    };
    Vm::new(&cfg, console).map_err(|e| {
        eprintln!("popek: {}", e.chain());
        2
    })
}

/// The engine `--engine` names; `None` for `auto`.
fn engine_kind(e: EngineArg) -> Option<EngineKind> {
    match e {
        EngineArg::Auto => None,
        EngineArg::Hw => Some(EngineKind::Hw),
        EngineArg::Bt => Some(EngineKind::Bt),
        EngineArg::Trap => Some(EngineKind::Trap),
        EngineArg::Interp => Some(EngineKind::Interp),
    }
}

fn run(a: RunArgs) -> u8 {
    let api = match api::start(&a.session) {
        Ok(api) => api,
        Err(code) => return code,
    };
    let (mut vm, api) = match api {
        Some((server, rx)) if a.no_boot => match api::preboot(&a, &rx) {
            Ok(vm) => (vm, Some((server, rx))),
            Err(code) => return code,
        },
        api => match make_vm(&a, Box::new(std::io::stdout())) {
            Ok(vm) => (vm, api),
            Err(code) => return code,
        },
    };
    if matches!(a.engine, EngineArg::Auto) && vm.engine_kind() == EngineKind::Hw {
        let mode = vm.cpu_mode();
        vm.set_fallback(EngineKind::fallback_for(mode));
    }
    drive(vm, &a.session, api)
}

/// Runs a built VM with the terminal as its console until it ends, and
/// reports: `popek run` and `popek restore`.
fn drive(mut vm: Vm, s: &Session, api: Option<api::Api>) -> u8 {
    if let Some(p) = &s.debugcon {
        match std::fs::File::create(p) {
            Ok(f) => vm.machine.set_debugcon(Box::new(f)),
            Err(e) => {
                eprintln!("popek: --debugcon {}: {e}", p.display());
                return 2;
            }
        }
    }
    if let Some(f) = s.fallback_engine.and_then(engine_kind) {
        vm.set_fallback(Some(f));
    }
    let _server = api.map(|(server, rx)| {
        vm.set_control(api::forward(rx));
        server
    });
    vm.set_snapshot_dir(s.snapshot_dir.clone());
    if let (Some(_), Some(i)) = (&s.trace, vm.engine.inspect()) {
        i.set_trace_traps(true);
    }
    let raw = console::enter_raw_mode();
    vm.set_input(console::spawn_reader());
    let outcome = match s.max_instructions {
        None => vm.run(),
        Some(n) => vm.run_limited(n).unwrap_or(Outcome::Stopped(n)),
    };
    let _ = std::io::stdout().flush();
    if raw {
        console::restore();
    }
    match &outcome {
        Outcome::Died(r) | Outcome::NoProgress(r) => eprintln!("{r}"),
        Outcome::Unsupported(r) => eprintln!("popek: {r}"),
        Outcome::Quit => eprintln!("popek: quit from the console"),
        Outcome::Ended(why) => eprintln!("popek: the VM ended: {why}"),
        Outcome::Stopped(n) => eprintln!(
            "popek: stopped after {n} instructions (--max-instructions)\n{}",
            popek_vmm::report::cpu_dump(vm.engine.as_mut())
        ),
        _ => {}
    }
    if let Some(addr) = s.dump_ccf {
        match vm.engine.inspect().and_then(|i| i.dump_translation(addr)) {
            Some(text) => eprint!("{text}"),
            None => eprintln!(
                "popek: --dump-ccf {addr:#x}: engine {} has no translation there",
                vm.engine.name()
            ),
        }
    }
    if s.stats {
        eprintln!("popek: {} statistics:", vm.engine.name());
        for (k, v) in vm.stats() {
            eprintln!("  {k:<28} {v}");
        }
        eprintln!("  {:<28} {}", "engine switches", vm.engine_switches());
        let irqs: Vec<String> = vm
            .machine
            .interrupt_counts()
            .iter()
            .map(|(v, n)| format!("{v:#04x}: {n}"))
            .collect();
        eprintln!("  {:<28} {}", "interrupts by vector", irqs.join(", "));
        if let Some(counts) = vm.vcpu_instructions() {
            for (cpu, n) in counts.iter().enumerate() {
                eprintln!("  {:<28} {n}", format!("instructions on vCPU {cpu}"));
            }
        }
        if vm.cpus() > 1 {
            for cpu in 0..vm.cpus() {
                let irqs: Vec<String> = vm
                    .machine
                    .interrupt_counts_of(cpu)
                    .iter()
                    .map(|(v, n)| format!("{v:#04x}: {n}"))
                    .collect();
                eprintln!("  {:<28} {}", format!("  on vCPU {cpu}"), irqs.join(", "));
            }
        }
        if let (Some(code), n) = vm.machine.post_code() {
            eprintln!(
                "  {:<28} {code:#04x} (last of {n})",
                "POST code (port 0x80)"
            );
        }
        let ports: Vec<String> = vm
            .machine
            .port_map()
            .iter()
            .map(|(name, base, len)| format!("{name} {base:#x}+{len}"))
            .chain(
                vm.machine
                    .mmio_map()
                    .iter()
                    .map(|(name, base, len)| format!("{name} {base:#x}+{len:#x}")),
            )
            .collect();
        eprintln!("  {:<28} {}", "machine devices", ports.join(", "));
        for (slot, d) in vm.machine.pci_devices() {
            let counts: Vec<String> = d.stats().iter().map(|(k, v)| format!("{k} {v}")).collect();
            eprintln!(
                "  {:<28} {}",
                format!("pci 00:{slot:02x}.0 {}", d.kind()),
                counts.join(", ")
            );
        }
        let touched = vm.machine.ram().resident_bytes();
        if let Some(rss) = popek_memory::process_rss() {
            eprintln!(
                "  {:<28} {:.1} MiB (RSS {:.1} MiB - guest RAM touched {:.1} MiB)",
                "memory overhead",
                rss.saturating_sub(touched) as f64 / 1048576.0,
                rss as f64 / 1048576.0,
                touched as f64 / 1048576.0
            );
        }
    }
    outcome.exit_status() as u8
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_env("POPEK_LOG"))
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let code = match cli.command {
        None => run(default_run()),
        Some(Command::Run(a)) => run(a),
        Some(Command::Initramfs(a)) => initramfs(a),
        Some(Command::Bench(a)) => bench(a),
        Some(Command::Info(a)) => info(a),
        Some(Command::Audit(a)) => audit(a),
        Some(Command::Snapshot(a)) => snapshot_cmd(a),
        Some(Command::Restore(a)) => restore(a),
        Some(Command::Guests) => {
            for g in popek_guests::NAMES {
                println!("{g}");
            }
            0
        }
    };
    ExitCode::from(code)
}
