//! The API socket around `popek run`: the pre-boot phase of
//! `--api-sock PATH --no-boot` (configure, then start or load a
//! snapshot), and the forwarding of runtime requests to the VM.

use std::sync::mpsc::{channel, Receiver};

use popek_api::{not_after_boot, not_before_boot, ApiCall, ApiRequest, PreBoot};
use popek_vmm::control::{Call, Fault};
use popek_vmm::Vm;

use crate::{engine_kind, make_vm, RunArgs, Session};

/// A started API server and the requests it receives.
pub type Api = (popek_api::ApiServer, Receiver<ApiCall>);

/// Starts the API server `--api-sock` asks for; `Err` is the exit status
/// after the message.
pub fn start(s: &Session) -> Result<Option<Api>, u8> {
    let Some(p) = &s.api_sock else {
        return Ok(None);
    };
    let (tx, rx) = channel();
    match popek_api::ApiServer::start(p, tx) {
        Ok(server) => Ok(Some((server, rx))),
        Err(e) => {
            eprintln!("popek: --api-sock {e}");
            Err(2)
        }
    }
}

/// Serves pre-boot requests until one starts a VM (`InstanceStart`, a
/// snapshot load) and returns it; `Err` is popek's exit status when the
/// API goes away first.
pub fn preboot(args: &RunArgs, rx: &Receiver<ApiCall>) -> Result<Vm, u8> {
    let mut a = args.clone();
    eprintln!(
        "popek: waiting for the API on {} to configure and start the VM",
        a.session
            .api_sock
            .as_ref()
            .map_or(String::new(), |p| p.display().to_string())
    );
    // Drives and interfaces by ID, in the order first put.
    let mut drives: Vec<(String, popek_vmm::DiskConfig, bool)> = Vec::new();
    let mut nets: Vec<(String, popek_vmm::NetConfig)> = Vec::new();
    for ApiCall { request, reply } in rx.iter() {
        let (answer, vm) = match request {
            ApiRequest::Vm(popek_vmm::control::Request::Info) => (
                Ok(serde_json::json!({
                    "id": format!("popek-{}", std::process::id()),
                    "state": "Not started",
                    "vmm_version": env!("CARGO_PKG_VERSION"),
                    "app_name": "popek",
                })),
                None,
            ),
            ApiRequest::Vm(popek_vmm::control::Request::MachineConfig) => (
                Ok(serde_json::json!({
                    "vcpu_count": a.cpus,
                    "mem_size_mib": a.memory >> 20,
                    "smt": false,
                    "track_dirty_pages": false,
                })),
                None,
            ),
            ApiRequest::Vm(_) => (Err(not_before_boot()), None),
            ApiRequest::PreBoot(p) => match p {
                PreBoot::BootSource {
                    kernel_image_path,
                    boot_args,
                    initrd_path,
                } => {
                    a.kernel = Some(kernel_image_path);
                    a.cmdline = boot_args.unwrap_or_default();
                    a.initrd = initrd_path;
                    (Ok(serde_json::Value::Null), None)
                }
                PreBoot::MachineConfig {
                    vcpu_count,
                    mem_size_mib,
                } => {
                    if vcpu_count
                        .is_some_and(|n| !(1..=u64::from(popek_vmm::MAX_CPUS)).contains(&n))
                    {
                        (Err(Fault::bad("vcpu_count must be between 1 and 32")), None)
                    } else {
                        if let Some(n) = vcpu_count {
                            a.cpus = n as u32;
                        }
                        match mem_size_mib {
                            Some(m)
                                if !(popek_vmm::MIN_MEMORY..=popek_vmm::MAX_MEMORY)
                                    .contains(&m.saturating_mul(1 << 20)) =>
                            {
                                (
                                    Err(Fault::bad("mem_size_mib must be between 2 and 3072")),
                                    None,
                                )
                            }
                            Some(m) => {
                                a.memory = m << 20;
                                (Ok(serde_json::Value::Null), None)
                            }
                            None => (Ok(serde_json::Value::Null), None),
                        }
                    }
                }
                PreBoot::Drive {
                    id,
                    path,
                    root,
                    read_only,
                } => {
                    if root && drives.iter().any(|(i, _, r)| *r && *i != id) {
                        (Err(Fault::bad("another drive is the root device")), None)
                    } else {
                        let disk = popek_vmm::DiskConfig {
                            path,
                            readonly: read_only,
                        };
                        match drives.iter_mut().find(|(i, _, _)| *i == id) {
                            Some(d) => *d = (id, disk, root),
                            None => drives.push((id, disk, root)),
                        }
                        (Ok(serde_json::Value::Null), None)
                    }
                }
                PreBoot::NetworkInterface { id, tap, mac } => {
                    match mac.map(|m| popek_vmm::parse_mac(&m)).transpose() {
                        Err(why) => (Err(Fault::bad(why)), None),
                        Ok(mac) => {
                            let net = popek_vmm::NetConfig { tap, mac };
                            match nets.iter_mut().find(|(i, _)| *i == id) {
                                Some(n) => n.1 = net,
                                None => nets.push((id, net)),
                            }
                            (Ok(serde_json::Value::Null), None)
                        }
                    }
                }
                PreBoot::InstanceStart => match make_vm(
                    &with_devices(&a, &drives, &nets),
                    Box::new(std::io::stdout()),
                ) {
                    Ok(vm) => (Ok(serde_json::Value::Null), Some(vm)),
                    Err(_) => (
                        Err(Fault::bad(
                            "the VM could not be built (popek's standard error says why)",
                        )),
                        None,
                    ),
                },
                PreBoot::LoadSnapshot {
                    snapshot_path,
                    mem_file_path,
                    resume_vm,
                } => load(&a, &snapshot_path, mem_file_path.as_deref(), resume_vm),
            },
        };
        let _ = reply.send(answer);
        if let Some(vm) = vm {
            return Ok(vm);
        }
    }
    eprintln!("popek: the API server stopped before the VM started");
    Err(2)
}

fn load(
    a: &RunArgs,
    path: &std::path::Path,
    mem: Option<&std::path::Path>,
    resume: bool,
) -> (popek_vmm::control::Reply, Option<Vm>) {
    if let Some(m) = mem {
        let named = popek_vmm::snapshot::read_state(path).map(|st| {
            popek_vmm::snapshot::resolve_path(&popek_vmm::snapshot::dir_of(path), &st.memory.file)
        });
        let same = |x: &std::path::Path| std::fs::canonicalize(x).ok();
        if let Ok(n) = named {
            if same(&n).is_none() || same(&n) != same(m) {
                return (
                    Err(Fault::bad(format!(
                        "mem_file_path {}: the snapshot's memory file is {}",
                        m.display(),
                        n.display()
                    ))),
                    None,
                );
            }
        }
    }
    let opts = popek_vmm::RestoreOptions {
        engine: engine_kind(a.engine),
        clone: false,
    };
    match Vm::restore(path, &opts, Box::new(std::io::stdout())) {
        Ok(mut vm) => {
            if !resume {
                vm.pause();
            }
            (Ok(serde_json::Value::Null), Some(vm))
        }
        Err(e) => (Err(Fault::bad(e.chain())), None),
    }
}

/// After boot: passes runtime requests on to the VM and refuses pre-boot
/// ones.
pub fn forward(rx: Receiver<ApiCall>) -> Receiver<Call> {
    let (tx, out) = channel();
    std::thread::spawn(move || {
        for ApiCall { request, reply } in rx.iter() {
            match request {
                ApiRequest::Vm(request) => {
                    if tx.send(Call { request, reply }).is_err() {
                        return;
                    }
                }
                ApiRequest::PreBoot(_) => {
                    let _ = reply.send(Err(not_after_boot()));
                }
            }
        }
    });
    out
}

/// The run's arguments with the drives and interfaces the API put: the
/// root drive first (Firecracker's order), `root=/dev/vda ro|rw` on the
/// command line for it, then the others in the order put.
fn with_devices(
    a: &RunArgs,
    drives: &[(String, popek_vmm::DiskConfig, bool)],
    nets: &[(String, popek_vmm::NetConfig)],
) -> RunArgs {
    let mut a = a.clone();
    let root = drives.iter().filter(|d| d.2);
    let others = drives.iter().filter(|d| !d.2);
    for (_, disk, is_root) in root.chain(others) {
        if *is_root {
            let mode = if disk.readonly { "ro" } else { "rw" };
            a.cmdline = format!("{} root=/dev/vda {mode}", a.cmdline)
                .trim()
                .to_string();
        }
        a.disks.push(disk.clone());
    }
    a.nets.extend(nets.iter().map(|n| n.1.clone()));
    a
}
