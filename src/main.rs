//! `popek`: the command-line front end.
//!
//! `popek run` boots a guest (by default the embedded minios) on an engine;
//! the serial console is the terminal. Exit statuses follow VISION.md:
//! 0 power-off/reset, odd for the debug-exit port, 2 bad input, 4 the guest
//! died, 6 no progress.

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
    /// Boot a guest with its serial console on this terminal (Ctrl-A x quits).
    Run(RunArgs),
    /// List the guests built into popek.
    Guests,
}

#[derive(Clone, Copy, ValueEnum)]
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
    /// Initial ramdisk (Linux) or module (Multiboot).
    #[arg(long, value_name = "FILE")]
    initrd: Option<PathBuf>,
    /// Kernel command line.
    #[arg(long, value_name = "STR", default_value = "")]
    cmdline: String,
    /// Guest RAM, e.g. 256M or 1G (2M to 3G).
    #[arg(long, short = 'm', value_name = "SIZE", default_value = "256M", value_parser = parse_size)]
    memory: u64,
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
    /// Print engine statistics when the guest ends.
    #[arg(long)]
    stats: bool,
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

fn default_run() -> RunArgs {
    RunArgs {
        engine: EngineArg::Auto,
        kernel: None,
        initrd: None,
        cmdline: String::new(),
        memory: 256 << 20,
        guest: "minios".into(),
        format: FormatArg::Auto,
        load_addr: 0x7c00,
        clock: ClockArg::Host,
        stats: false,
    }
}

fn run(a: RunArgs) -> u8 {
    let engine = match a.engine {
        EngineArg::Auto => {
            let (e, why) = EngineKind::auto();
            eprintln!("popek: engine auto -> {} ({why})", e.name());
            e
        }
        EngineArg::Hw => EngineKind::Hw,
        EngineArg::Bt => EngineKind::Bt,
        EngineArg::Trap => EngineKind::Trap,
        EngineArg::Interp => EngineKind::Interp,
    };
    let kernel = match a.kernel {
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
    let cfg = VmConfig {
        memory: a.memory,
        kernel,
        initrd: a.initrd,
        cmdline: a.cmdline,
        engine,
        clock: match a.clock {
            ClockArg::Host => ClockMode::Host,
            ClockArg::Virtual => ClockMode::Virtual,
        },
    };
    let mut vm = match Vm::new(&cfg, Box::new(std::io::stdout())) {
        Ok(vm) => vm,
        Err(e) => {
            eprintln!("popek: {e}");
            return 2;
        }
    };
    let raw = console::enter_raw_mode();
    vm.set_input(console::spawn_reader());
    let outcome = vm.run();
    let _ = std::io::stdout().flush();
    if raw {
        console::restore();
    }
    match &outcome {
        Outcome::Died(r) | Outcome::NoProgress(r) => eprintln!("{r}"),
        Outcome::Quit => eprintln!("popek: quit from the console"),
        _ => {}
    }
    if a.stats {
        eprintln!("popek: {} statistics:", vm.engine.name());
        for (k, v) in vm.engine.stats() {
            eprintln!("  {k:<28} {v}");
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
        Some(Command::Guests) => {
            for g in popek_guests::NAMES {
                println!("{g}");
            }
            0
        }
    };
    ExitCode::from(code)
}
