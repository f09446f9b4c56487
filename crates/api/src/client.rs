//! A client for the API socket, for popek's own commands (`popek
//! snapshot`): one HTTP/1.1 request per connection, the response parsed
//! with `httparse`.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

/// A response: status and body.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Response {
    /// HTTP status.
    pub status: u16,
    /// The body (JSON or empty).
    pub body: String,
}

impl Response {
    /// The fault message of an error response, else the body.
    pub fn message(&self) -> String {
        serde_json::from_str::<serde_json::Value>(&self.body)
            .ok()
            .and_then(|v| {
                v.get("fault_message")
                    .and_then(|m| m.as_str())
                    .map(String::from)
            })
            .unwrap_or_else(|| self.body.clone())
    }

    /// Whether the status is 2xx.
    pub fn ok(&self) -> bool {
        (200..300).contains(&self.status)
    }
}

/// Sends `method path` with a JSON `body` to the API socket at `sock`.
pub fn request(
    sock: &Path,
    method: &str,
    path: &str,
    body: Option<&serde_json::Value>,
) -> Result<Response, String> {
    let err = |e: std::io::Error| format!("{}: {e}", sock.display());
    let mut s = UnixStream::connect(sock).map_err(err)?;
    s.set_read_timeout(Some(Duration::from_secs(120)))
        .map_err(err)?;
    let body = body.map(|b| b.to_string()).unwrap_or_default();
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: localhost\r\nAccept: application/json\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .map_err(err)?;
    let mut data = Vec::new();
    s.read_to_end(&mut data).map_err(err)?;
    let mut headers = [httparse::EMPTY_HEADER; 32];
    let mut r = httparse::Response::new(&mut headers);
    let head = match r.parse(&data) {
        Ok(httparse::Status::Complete(n)) => n,
        _ => return Err(format!("{}: not an HTTP response", sock.display())),
    };
    Ok(Response {
        status: r.code.unwrap_or(0),
        body: String::from_utf8_lossy(&data[head..]).into_owned(),
    })
}
