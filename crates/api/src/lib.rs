//! popek's control API: the endpoints Firecracker's OpenAPI specification
//! defines for what popek shares with it, served over HTTP/1.1 on a Unix
//! socket (`popek run --api-sock PATH`), plus a small client for the
//! command line (`popek snapshot`).
//!
//! The server thread only speaks HTTP: it parses a request into an
//! [`ApiRequest`], sends it with a reply channel to the VMM thread, and
//! turns the reply into a response — 204 with no body, 200 with JSON, or
//! a fault (`{"fault_message": "..."}`, status 400 as Firecracker gives).
//! Requests for the running VM are [`popek_vmm::control::Request`]s; the
//! pre-boot ones ([`PreBoot`]) configure and start a VM from
//! `popek run --api-sock PATH --no-boot`. `docs/snapshots.md` lists them.

pub mod client;

use std::path::{Path, PathBuf};
use std::sync::mpsc::{channel, Sender};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use popek_vmm::control::{Fault, Reply, Request};
use popek_vmm::snapshot::SnapshotKind;
use popek_vmm::EngineKind;
use serde::Deserialize;

/// The largest request body read.
const MAX_BODY: u64 = 64 << 10;

/// How long the server waits for the VMM to answer.
const REPLY_TIMEOUT: Duration = Duration::from_secs(60);

/// Configuration and start requests, valid only before the VM boots.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PreBoot {
    /// `PUT /boot-source`.
    BootSource {
        /// The kernel.
        kernel_image_path: PathBuf,
        /// Its command line.
        boot_args: Option<String>,
        /// An initrd.
        initrd_path: Option<PathBuf>,
    },
    /// `PUT` or `PATCH /machine-config`.
    MachineConfig {
        /// vCPUs: popek runs one.
        vcpu_count: Option<u64>,
        /// RAM in MiB.
        mem_size_mib: Option<u64>,
    },
    /// `PUT /drives/{drive_id}`: a virtio-blk disk (added, or replaced
    /// when the ID exists).
    Drive {
        /// The drive's ID.
        id: String,
        /// The raw image.
        path: PathBuf,
        /// It is the root device: first (`/dev/vda`), and `root=/dev/vda`
        /// with `ro`/`rw` goes on the kernel command line.
        root: bool,
        /// The guest may not write it.
        read_only: bool,
    },
    /// `PUT /network-interfaces/{iface_id}`: a virtio-net interface on a
    /// host TAP.
    NetworkInterface {
        /// The interface's ID.
        id: String,
        /// The TAP device.
        tap: String,
        /// The guest's MAC address.
        mac: Option<String>,
    },
    /// `PUT /actions` `InstanceStart`.
    InstanceStart,
    /// `PUT /snapshot/load`.
    LoadSnapshot {
        /// The state file.
        snapshot_path: PathBuf,
        /// The memory file, when given (it must be the one the state file
        /// names).
        mem_file_path: Option<PathBuf>,
        /// Run at once (else the VM starts paused).
        resume_vm: bool,
    },
}

/// What the server asks of the VMM thread.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ApiRequest {
    /// A request to the running VM (before boot: answered by the pre-boot
    /// handler, mostly with a fault).
    Vm(Request),
    /// A pre-boot request (after boot: refused).
    PreBoot(PreBoot),
}

/// A request with its reply channel.
#[derive(Debug)]
pub struct ApiCall {
    /// The request.
    pub request: ApiRequest,
    /// Where the reply goes.
    pub reply: Sender<Reply>,
}

/// The fault for a pre-boot request after boot.
pub fn not_after_boot() -> Fault {
    Fault::bad("The requested operation is not supported after starting the microVM.")
}

/// The fault for a runtime request before boot.
pub fn not_before_boot() -> Fault {
    Fault::bad("The requested operation is not supported before starting the microVM.")
}

/// A running API server. Dropping it stops the server and removes the
/// socket.
pub struct ApiServer {
    server: Arc<tiny_http::Server>,
    path: PathBuf,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        self.server.unblock();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        let _ = std::fs::remove_file(&self.path);
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct VmPatch {
    state: Option<String>,
    /// popek extension: move the vCPU to this engine.
    engine: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SnapshotCreate {
    snapshot_path: PathBuf,
    mem_file_path: Option<PathBuf>,
    snapshot_type: Option<String>,
    #[allow(dead_code)]
    version: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct MemBackend {
    backend_type: String,
    backend_path: PathBuf,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SnapshotLoad {
    snapshot_path: PathBuf,
    mem_file_path: Option<PathBuf>,
    mem_backend: Option<MemBackend>,
    #[allow(dead_code)]
    enable_diff_snapshots: Option<bool>,
    #[allow(dead_code)]
    track_dirty_pages: Option<bool>,
    #[serde(default)]
    resume_vm: bool,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct BootSource {
    kernel_image_path: PathBuf,
    boot_args: Option<String>,
    initrd_path: Option<PathBuf>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Drive {
    drive_id: String,
    path_on_host: PathBuf,
    is_root_device: bool,
    #[serde(default)]
    is_read_only: bool,
    #[allow(dead_code)]
    partuuid: Option<String>,
    cache_type: Option<String>,
    io_engine: Option<String>,
    rate_limiter: Option<serde_json::Value>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NetworkInterface {
    iface_id: String,
    host_dev_name: String,
    guest_mac: Option<String>,
    rx_rate_limiter: Option<serde_json::Value>,
    tx_rate_limiter: Option<serde_json::Value>,
}

/// The ID at the end of `path` after `prefix`, which must be the body's.
fn path_id(path: &str, prefix: &str, body_id: &str, what: &str) -> Result<String, Fault> {
    let id = path.strip_prefix(prefix).unwrap_or_default();
    if id.is_empty() || id.contains('/') {
        return Err(Fault::bad(format!("{what}: the path names no ID")));
    }
    if id != body_id {
        return Err(Fault::bad(format!(
            "{what}: the ID in the path ({id}) is not the body's ({body_id})"
        )));
    }
    Ok(id.to_string())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct MachineConfig {
    vcpu_count: Option<u64>,
    mem_size_mib: Option<u64>,
    smt: Option<bool>,
    track_dirty_pages: Option<bool>,
    #[allow(dead_code)]
    cpu_template: Option<String>,
    #[allow(dead_code)]
    huge_pages: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Action {
    action_type: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Metrics {
    metrics_path: PathBuf,
}

fn parse<'a, T: Deserialize<'a>>(body: &'a [u8]) -> Result<T, Fault> {
    serde_json::from_slice(body).map_err(|e| {
        Fault::bad(format!(
            "An error occurred when deserializing the json body of a request: {e}."
        ))
    })
}

/// What one request becomes: a call to the VMM, or an answer the server
/// gives itself (the metrics file).
enum Route {
    Call(Vec<ApiRequest>),
    Metrics(PathBuf),
    Flush,
}

fn route(method: &tiny_http::Method, path: &str, body: &[u8]) -> Result<Route, Fault> {
    use tiny_http::Method::{Get, Patch, Put};
    let vm = |r| Ok(Route::Call(vec![ApiRequest::Vm(r)]));
    let pre = |r| Ok(Route::Call(vec![ApiRequest::PreBoot(r)]));
    match (method, path) {
        (Get, "/") => vm(Request::Info),
        (Get, "/machine-config") => vm(Request::MachineConfig),
        (Put | Patch, "/machine-config") => {
            let m: MachineConfig = parse(body)?;
            if m.smt == Some(true) {
                return Err(Fault::bad("popek's vCPU has no SMT siblings"));
            }
            if m.track_dirty_pages == Some(true) {
                return Err(Fault::bad(
                    "dirty-page tracking is not needed: popek's diff snapshots compare with the parent",
                ));
            }
            pre(PreBoot::MachineConfig {
                vcpu_count: m.vcpu_count,
                mem_size_mib: m.mem_size_mib,
            })
        }
        (Put, p) if p.starts_with("/drives/") => {
            let d: Drive = parse(body)?;
            let id = path_id(p, "/drives/", &d.drive_id, "PUT /drives")?;
            if d.rate_limiter.is_some() {
                return Err(Fault::bad("rate limiters are not implemented yet"));
            }
            if d.io_engine.as_deref().is_some_and(|e| e != "Sync") {
                return Err(Fault::bad(
                    "io_engine: popek's disks have one engine, Sync (a worker thread)",
                ));
            }
            if d.cache_type
                .as_deref()
                .is_some_and(|c| c != "Unsafe" && c != "Writeback")
            {
                return Err(Fault::bad("cache_type is Unsafe or Writeback"));
            }
            pre(PreBoot::Drive {
                id,
                path: d.path_on_host,
                root: d.is_root_device,
                read_only: d.is_read_only,
            })
        }
        (Put, p) if p.starts_with("/network-interfaces/") => {
            let n: NetworkInterface = parse(body)?;
            let id = path_id(
                p,
                "/network-interfaces/",
                &n.iface_id,
                "PUT /network-interfaces",
            )?;
            if n.rx_rate_limiter.is_some() || n.tx_rate_limiter.is_some() {
                return Err(Fault::bad("rate limiters are not implemented yet"));
            }
            pre(PreBoot::NetworkInterface {
                id,
                tap: n.host_dev_name,
                mac: n.guest_mac,
            })
        }
        (Put, "/boot-source") => {
            let b: BootSource = parse(body)?;
            pre(PreBoot::BootSource {
                kernel_image_path: b.kernel_image_path,
                boot_args: b.boot_args,
                initrd_path: b.initrd_path,
            })
        }
        (Patch, "/vm") => {
            let p: VmPatch = parse(body)?;
            let mut calls = Vec::new();
            if let Some(e) = p.engine {
                let k = EngineKind::by_name(&e).ok_or_else(|| {
                    Fault::bad(format!("unknown engine {e:?} (hw, bt, trap, interp)"))
                })?;
                calls.push(ApiRequest::Vm(Request::SwitchEngine(k)));
            }
            match p.state.as_deref() {
                Some("Paused") => calls.push(ApiRequest::Vm(Request::Pause)),
                Some("Resumed") => calls.push(ApiRequest::Vm(Request::Resume)),
                Some(s) => {
                    return Err(Fault::bad(format!(
                        "An error occurred when deserializing the json body of a request: unknown variant `{s}`, expected `Paused` or `Resumed`."
                    )))
                }
                None => {}
            }
            if calls.is_empty() {
                return Err(Fault::bad(
                    "PATCH /vm needs a state (or, in popek, an engine)",
                ));
            }
            Ok(Route::Call(calls))
        }
        (Put, "/snapshot/create") => {
            let s: SnapshotCreate = parse(body)?;
            let kind = match s.snapshot_type.as_deref() {
                None | Some("Full") => SnapshotKind::Full,
                Some("Diff") => SnapshotKind::Diff,
                Some(t) => {
                    return Err(Fault::bad(format!(
                        "unknown snapshot_type {t:?} (Full, Diff)"
                    )))
                }
            };
            vm(Request::Snapshot {
                state: s.snapshot_path,
                mem: s.mem_file_path,
                kind,
            })
        }
        (Put, "/snapshot/load") => {
            let s: SnapshotLoad = parse(body)?;
            let mem = match (s.mem_file_path, s.mem_backend) {
                (Some(_), Some(_)) => {
                    return Err(Fault::bad(
                        "give either mem_file_path or mem_backend, not both",
                    ))
                }
                (Some(p), None) => Some(p),
                (None, Some(b)) if b.backend_type == "File" => Some(b.backend_path),
                (None, Some(b)) => {
                    return Err(Fault::bad(format!(
                        "mem_backend type {:?}: popek loads memory from a File",
                        b.backend_type
                    )))
                }
                (None, None) => None,
            };
            pre(PreBoot::LoadSnapshot {
                snapshot_path: s.snapshot_path,
                mem_file_path: mem,
                resume_vm: s.resume_vm,
            })
        }
        (Put, "/actions") => {
            let a: Action = parse(body)?;
            match a.action_type.as_str() {
                "InstanceStart" => pre(PreBoot::InstanceStart),
                "SendCtrlAltDel" => vm(Request::CtrlAltDel),
                "FlushMetrics" => Ok(Route::Flush),
                // popek extension: end the VM (`popek snapshot --stop`).
                "Stop" => vm(Request::Stop),
                t => Err(Fault::bad(format!(
                    "unknown action_type {t:?} (InstanceStart, SendCtrlAltDel, FlushMetrics, Stop)"
                ))),
            }
        }
        (Put, "/metrics") => {
            let m: Metrics = parse(body)?;
            Ok(Route::Metrics(m.metrics_path))
        }
        _ => Err(Fault::bad(format!(
            "Invalid request method and/or path: {method} {path}."
        ))),
    }
}

fn call(tx: &Sender<ApiCall>, request: ApiRequest) -> Reply {
    let (rtx, rrx) = channel();
    tx.send(ApiCall {
        request,
        reply: rtx,
    })
    .map_err(|_| Fault::bad("the VM has ended"))?;
    rrx.recv_timeout(REPLY_TIMEOUT)
        .map_err(|_| Fault::bad("the VM did not answer"))?
}

fn respond(req: tiny_http::Request, reply: Reply) {
    let json = tiny_http::Header::from_bytes("Content-Type", "application/json").ok();
    let r = match reply {
        Ok(serde_json::Value::Null) => {
            tiny_http::Response::from_data(Vec::new()).with_status_code(204)
        }
        Ok(v) => tiny_http::Response::from_data(v.to_string().into_bytes()).with_status_code(200),
        Err(f) => tiny_http::Response::from_data(
            serde_json::json!({ "fault_message": f.message })
                .to_string()
                .into_bytes(),
        )
        .with_status_code(f.status),
    };
    let r = match json {
        Some(h) => r.with_header(h),
        None => r,
    };
    if let Err(e) = req.respond(r) {
        tracing::debug!("api: response not sent: {e}");
    }
}

fn handle(mut req: tiny_http::Request, tx: &Sender<ApiCall>, metrics: &Mutex<Option<PathBuf>>) {
    use std::io::Read;
    let method = req.method().clone();
    let path = req.url().split('?').next().unwrap_or("").to_string();
    let mut body = Vec::new();
    let read = req.as_reader().take(MAX_BODY + 1).read_to_end(&mut body);
    if read.is_err() || body.len() as u64 > MAX_BODY {
        return respond(
            req,
            Err(Fault::bad(
                "the request body is unreadable or larger than 64 KiB",
            )),
        );
    }
    let reply = match route(&method, &path, &body) {
        Err(f) => Err(f),
        Ok(Route::Metrics(p)) => {
            let ok = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&p);
            match ok {
                Ok(_) => {
                    if let Ok(mut m) = metrics.lock() {
                        *m = Some(p);
                    }
                    Ok(serde_json::Value::Null)
                }
                Err(e) => Err(Fault::bad(format!("{}: {e}", p.display()))),
            }
        }
        Ok(Route::Flush) => {
            let target = metrics.lock().ok().and_then(|m| m.clone());
            match target {
                None => Err(Fault::bad("no metrics file: PUT /metrics first")),
                Some(p) => call(tx, ApiRequest::Vm(Request::Metrics)).and_then(|v| {
                    use std::io::Write;
                    std::fs::OpenOptions::new()
                        .append(true)
                        .open(&p)
                        .and_then(|mut f| writeln!(f, "{v}"))
                        .map(|_| serde_json::Value::Null)
                        .map_err(|e| Fault::bad(format!("{}: {e}", p.display())))
                }),
            }
        }
        Ok(Route::Call(calls)) => {
            let mut last = Ok(serde_json::Value::Null);
            for c in calls {
                last = call(tx, c);
                if last.is_err() {
                    break;
                }
            }
            last
        }
    };
    respond(req, reply);
}

impl ApiServer {
    /// Listens on the Unix socket `path` (refusing a path where something
    /// other than a stale socket exists) and sends every request to `tx`.
    pub fn start(path: &Path, tx: Sender<ApiCall>) -> Result<ApiServer, String> {
        use std::os::unix::fs::FileTypeExt;
        if let Ok(meta) = std::fs::symlink_metadata(path) {
            if !meta.file_type().is_socket() {
                return Err(format!(
                    "{}: exists and is not a socket; refusing to replace it",
                    path.display()
                ));
            }
            if std::os::unix::net::UnixStream::connect(path).is_ok() {
                return Err(format!("{}: another process is serving it", path.display()));
            }
            let _ = std::fs::remove_file(path);
        }
        let server = Arc::new(
            tiny_http::Server::http_unix(path).map_err(|e| format!("{}: {e}", path.display()))?,
        );
        let s = server.clone();
        let metrics = Mutex::new(None);
        let thread = std::thread::Builder::new()
            .name("popek-api".into())
            .spawn(move || {
                for req in s.incoming_requests() {
                    handle(req, &tx, &metrics);
                }
            })
            .map_err(|e| e.to_string())?;
        Ok(ApiServer {
            server,
            path: path.to_path_buf(),
            thread: Some(thread),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tiny_http::Method;

    #[test]
    fn drives_and_network_interfaces_route_like_firecracker() {
        let r = route(
            &Method::Put,
            "/drives/rootfs",
            br#"{"drive_id":"rootfs","path_on_host":"/img","is_root_device":true,"is_read_only":false}"#,
        )
        .unwrap_or_else(|f| panic!("{}", f.message));
        assert!(matches!(
            r,
            Route::Call(ref v) if v == &[ApiRequest::PreBoot(PreBoot::Drive {
                id: "rootfs".into(),
                path: "/img".into(),
                root: true,
                read_only: false,
            })]
        ));
        let r = route(
            &Method::Put,
            "/network-interfaces/eth0",
            br#"{"iface_id":"eth0","host_dev_name":"tap0","guest_mac":"06:00:AC:10:00:02"}"#,
        )
        .unwrap_or_else(|f| panic!("{}", f.message));
        assert!(matches!(
            r,
            Route::Call(ref v) if v == &[ApiRequest::PreBoot(PreBoot::NetworkInterface {
                id: "eth0".into(),
                tap: "tap0".into(),
                mac: Some("06:00:AC:10:00:02".into()),
            })]
        ));
        for (p, b) in [
            ("/drives/a", &br#"{"drive_id":"b","path_on_host":"/i","is_root_device":false}"#[..]),
            ("/drives/", br#"{"drive_id":"","path_on_host":"/i","is_root_device":false}"#),
            ("/drives/a", br#"{"drive_id":"a","path_on_host":"/i"}"#),
            (
                "/drives/a",
                br#"{"drive_id":"a","path_on_host":"/i","is_root_device":false,"rate_limiter":{}}"#,
            ),
            (
                "/drives/a",
                br#"{"drive_id":"a","path_on_host":"/i","is_root_device":false,"io_engine":"Async"}"#,
            ),
            ("/network-interfaces/x", br#"{"iface_id":"y","host_dev_name":"t"}"#),
            (
                "/network-interfaces/x",
                br#"{"iface_id":"x","host_dev_name":"t","tx_rate_limiter":{}}"#,
            ),
        ] {
            assert!(route(&Method::Put, p, b).is_err(), "{p} {}", String::from_utf8_lossy(b));
        }
    }

    #[test]
    fn requests_route_like_firecracker() {
        let r = route(&Method::Patch, "/vm", br#"{"state":"Paused"}"#)
            .ok()
            .unwrap();
        assert!(matches!(r, Route::Call(c) if c == vec![ApiRequest::Vm(Request::Pause)]));
        let r = route(
            &Method::Put,
            "/snapshot/create",
            br#"{"snapshot_type":"Diff","snapshot_path":"a","mem_file_path":"b"}"#,
        )
        .ok()
        .unwrap();
        assert!(
            matches!(r, Route::Call(c) if c == vec![ApiRequest::Vm(Request::Snapshot {
            state: "a".into(), mem: Some("b".into()), kind: SnapshotKind::Diff })])
        );
        let r = route(
            &Method::Put,
            "/snapshot/load",
            br#"{"snapshot_path":"a","mem_backend":{"backend_type":"File","backend_path":"m"},"resume_vm":true}"#,
        )
        .ok()
        .unwrap();
        assert!(
            matches!(r, Route::Call(c) if c == vec![ApiRequest::PreBoot(PreBoot::LoadSnapshot {
            snapshot_path: "a".into(), mem_file_path: Some("m".into()), resume_vm: true })])
        );
    }

    #[test]
    fn malformed_requests_are_faults() {
        for (m, p, b) in [
            (Method::Get, "/nowhere", &b""[..]),
            (Method::Delete, "/vm", b""),
            (Method::Patch, "/vm", b"{"),
            (Method::Patch, "/vm", br#"{"state":"Sleeping"}"#),
            (Method::Patch, "/vm", br#"{"stat":"Paused"}"#),
            (Method::Patch, "/vm", br#"{}"#),
            (Method::Put, "/actions", br#"{"action_type":"Explode"}"#),
            (Method::Put, "/snapshot/create", br#"{"mem_file_path":"b"}"#),
            (Method::Put, "/machine-config", br#"{"smt":true}"#),
        ] {
            let e = route(&m, p, b)
                .err()
                .unwrap_or_else(|| panic!("{m} {p} accepted"));
            assert_eq!(e.status, 400);
            assert!(!e.message.is_empty());
        }
    }
}
