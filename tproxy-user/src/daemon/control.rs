//! The running instance's control socket (a unix stream socket next to its lock file). Three
//! requests, one per connection, as a line of text:
//!
//! - `status`: the instance answers with a JSON document (see `run::status_report`).
//! - `reload`: the instance re-reads its configuration (as on SIGHUP) and answers with a JSON
//!   line saying what is in force now or why the new configuration was rejected.
//! - `takeover`: a new `tproxy run --pin` asks for the instance's place. The instance answers
//!   with a JSON line describing its listeners, then passes the descriptors — its instance
//!   lock first, then every listening socket — as SCM_RIGHTS. The new instance sets itself up
//!   with them and writes `done`; only then does the old one stop accepting and drain. If the
//!   new one fails or disconnects first, the old one carries on as if nothing happened.
//!
//! The listening sockets are the same kernel sockets throughout, so connections that arrive
//! during the handover wait in their accept queue and nothing is refused.

use std::{
    io::{BufRead, BufReader, IoSlice, IoSliceMut, Read, Write},
    os::{
        fd::{AsRawFd, FromRawFd, OwnedFd, RawFd},
        unix::{fs::PermissionsExt, net::UnixStream},
    },
    path::PathBuf,
    time::Duration,
};

use anyhow::{bail, Context, Result};
use nix::sys::socket::{recvmsg, sendmsg, ControlMessage, ControlMessageOwned, MsgFlags};
use serde::{Deserialize, Serialize};

use crate::{daemon::instance, relay::listener::HandedListener};

/// Descriptors per SCM_RIGHTS message (the kernel takes at most 253).
const FDS_PER_MESSAGE: usize = 200;
/// How long a new instance may take to set up before the old one gives up on it.
pub(crate) const TAKEOVER_TIMEOUT: Duration = Duration::from_secs(120);

/// The control socket of the instance for `table` in this network namespace.
pub(crate) fn socket_path(table: u32) -> Result<PathBuf> {
    instance::path(table, "sock")
}

/// What a connection to the control socket asks for.
pub(crate) enum Request {
    Status(UnixStream),
    Takeover(UnixStream),
    Reload(UnixStream),
}

/// Binds the control socket (replacing the file of an instance that is gone or handing
/// over), readable by root only, and forwards each request to `requests`.
pub(crate) fn serve(table: u32, requests: tokio::sync::mpsc::Sender<Request>) -> Result<()> {
    let path = socket_path(table)?;
    let _ = std::fs::remove_file(&path);
    let listener = std::os::unix::net::UnixListener::bind(&path)
        .with_context(|| format!("binding the control socket {}", path.display()))?;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))?;
    listener.set_nonblocking(true)?;
    let listener = tokio::net::UnixListener::from_std(listener)?;
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                // Out of descriptors, most likely: try again later rather than spin.
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            };
            let requests = requests.clone();
            tokio::task::spawn_blocking(move || {
                let Ok(stream) = stream.into_std() else {
                    return;
                };
                if let Some(request) = read_request(stream) {
                    let _ = requests.blocking_send(request);
                }
            });
        }
    });
    Ok(())
}

fn read_request(stream: UnixStream) -> Option<Request> {
    stream.set_nonblocking(false).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    // The answer is written from a blocking-pool thread: a client that stops reading frees
    // it after this long.
    stream
        .set_write_timeout(Some(Duration::from_secs(5)))
        .ok()?;
    let mut line = String::new();
    BufReader::new(&stream).take(64).read_line(&mut line).ok()?;
    match line.trim() {
        "status" => Some(Request::Status(stream)),
        "takeover" => Some(Request::Takeover(stream)),
        "reload" => Some(Request::Reload(stream)),
        other => {
            log::warn!("control socket: unknown request {other:?}");
            None
        }
    }
}

/// The JSON line that starts a handover (or says why there is none).
#[derive(Debug, Default, Serialize, Deserialize)]
struct Offer {
    #[serde(default)]
    error: Option<String>,
    #[serde(default)]
    pid: u32,
    #[serde(default)]
    listeners: Vec<HandedListener>,
}

/// Old side: refuses a takeover, with the reason.
pub(crate) fn refuse(mut stream: UnixStream, reason: &str) {
    let offer = Offer {
        error: Some(reason.to_string()),
        ..Offer::default()
    };
    let _ = writeln!(
        stream,
        "{}",
        serde_json::to_string(&offer).unwrap_or_default()
    );
}

/// Old side: sends the lock and the listeners; the caller then waits with [`await_done`].
pub(crate) fn offer(
    stream: &mut UnixStream,
    lock: RawFd,
    listeners: Vec<HandedListener>,
    sockets: &[RawFd],
) -> Result<()> {
    let offer = Offer {
        error: None,
        pid: std::process::id(),
        listeners,
    };
    writeln!(stream, "{}", serde_json::to_string(&offer)?)?;
    let fds: Vec<RawFd> = std::iter::once(lock)
        .chain(sockets.iter().copied())
        .collect();
    for chunk in fds.chunks(FDS_PER_MESSAGE) {
        sendmsg::<()>(
            stream.as_raw_fd(),
            &[IoSlice::new(b"F")],
            &[ControlMessage::ScmRights(chunk)],
            MsgFlags::empty(),
            None,
        )
        .context("passing descriptors")?;
    }
    Ok(())
}

/// Old side: whether the new instance said it has taken over (`false`: it failed or went
/// away, and the old one stays in charge).
pub(crate) fn await_done(stream: UnixStream) -> bool {
    let _ = stream.set_read_timeout(Some(TAKEOVER_TIMEOUT));
    let mut line = String::new();
    let _ = BufReader::new(&stream).take(64).read_line(&mut line);
    line.trim() == "done"
}

/// New side: what the running instance handed over.
pub(crate) struct Takeover {
    stream: UnixStream,
    /// The old instance's pid.
    pub pid: u32,
    /// Each listener with its sockets' descriptors, in [`HandedListener::sockets`] order.
    pub listeners: Vec<(HandedListener, Vec<OwnedFd>)>,
}

/// New side: asks the instance running for `table` for its place; returns what it handed
/// over and its instance lock, still held (the same open file as the old instance's).
/// `Ok(None)`: nothing answers on its control socket.
pub(crate) fn take_over(table: u32) -> Result<Option<(Takeover, OwnedFd)>> {
    let Some(mut stream) = connect(table)? else {
        return Ok(None);
    };
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    stream.write_all(b"takeover\n")?;
    // Byte by byte: the descriptors ride on the bytes after the line.
    let mut line = Vec::new();
    let mut byte = [0u8; 1];
    while byte[0] != b'\n' {
        if stream.read(&mut byte)? == 0 {
            bail!("the running instance closed its control socket without answering");
        }
        line.push(byte[0]);
    }
    let offer: Offer = serde_json::from_slice(&line).context("reading the takeover offer")?;
    if let Some(error) = offer.error {
        bail!(
            "the running instance (pid {}) cannot hand over: {error}",
            offer.pid
        );
    }
    let wanted = 1 + offer
        .listeners
        .iter()
        .map(|l| l.sockets.len())
        .sum::<usize>();
    let mut fds = Vec::with_capacity(wanted);
    while fds.len() < wanted {
        let mut space = nix::cmsg_space!([RawFd; FDS_PER_MESSAGE]);
        let mut buffer = [0u8; 1];
        let mut iov = [IoSliceMut::new(&mut buffer)];
        let message = recvmsg::<()>(
            stream.as_raw_fd(),
            &mut iov,
            Some(&mut space),
            MsgFlags::MSG_CMSG_CLOEXEC,
        )
        .context("receiving descriptors")?;
        if message.bytes == 0 {
            bail!("the running instance went away in the middle of the handover");
        }
        for cmsg in message.cmsgs()? {
            if let ControlMessageOwned::ScmRights(received) = cmsg {
                // SAFETY: SCM_RIGHTS installed these descriptors in this process for us.
                fds.extend(
                    received
                        .into_iter()
                        .map(|fd| unsafe { OwnedFd::from_raw_fd(fd) }),
                );
            }
        }
    }
    let mut fds = fds.into_iter();
    let lock = fds.next().context("no lock in the handover")?;
    let listeners = offer
        .listeners
        .into_iter()
        .map(|listener| {
            let sockets = fds.by_ref().take(listener.sockets.len()).collect();
            (listener, sockets)
        })
        .collect();
    let takeover = Takeover {
        stream,
        pid: offer.pid,
        listeners,
    };
    Ok(Some((takeover, lock)))
}

impl Takeover {
    /// Tells the old instance that this one is in charge now: it stops accepting and drains.
    pub(crate) fn complete(mut self) -> Result<()> {
        self.stream
            .write_all(b"done\n")
            .context("telling the old instance to drain")
    }
}

/// Asks the instance running for `table` for its status report. `Ok(None)`: none answers.
pub(crate) fn request_status(table: u32) -> Result<Option<crate::stats::InstanceStatus>> {
    let Some(mut stream) = connect(table)? else {
        return Ok(None);
    };
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    stream.write_all(b"status\n")?;
    let mut text = String::new();
    stream
        .read_to_string(&mut text)
        .context("reading the running instance's status")?;
    Ok(Some(
        serde_json::from_str(&text).context("parsing the running instance's status")?,
    ))
}

/// How long `tproxy reload` waits for the answer: compiling a large rule set takes a while.
const RELOAD_TIMEOUT: Duration = Duration::from_secs(600);

/// The instance's answer to `reload`.
#[derive(Debug, Serialize, Deserialize)]
pub(crate) struct ReloadAnswer {
    /// The instance's pid.
    pub pid: u32,
    /// What is in force now, or why the new configuration was rejected (the previous one
    /// stays in force).
    pub outcome: std::result::Result<String, String>,
}

/// Instance side: answers a `reload` request.
pub(crate) fn answer_reload(mut stream: UnixStream, outcome: std::result::Result<String, String>) {
    let answer = ReloadAnswer {
        pid: std::process::id(),
        outcome,
    };
    let _ = writeln!(
        stream,
        "{}",
        serde_json::to_string(&answer).unwrap_or_default()
    );
}

/// Asks the instance running for `table` to reload and waits for its answer. `Ok(None)`:
/// none answers.
pub(crate) fn request_reload(table: u32) -> Result<Option<ReloadAnswer>> {
    let Some(mut stream) = connect(table)? else {
        return Ok(None);
    };
    stream.set_read_timeout(Some(RELOAD_TIMEOUT))?;
    stream.write_all(b"reload\n")?;
    let mut line = String::new();
    BufReader::new(&stream)
        .read_line(&mut line)
        .context("waiting for the running instance to reload")?;
    if line.is_empty() {
        bail!(
            "the running instance closed its control socket without answering (a tproxy too old \
             to answer `reload`? send it SIGHUP and read its log)"
        );
    }
    Ok(Some(
        serde_json::from_str(&line).context("reading the running instance's answer")?,
    ))
}

/// The control socket refused this process: it is root's only.
#[derive(Debug)]
pub struct PermissionDenied {
    /// The control socket.
    pub path: PathBuf,
}

impl std::fmt::Display for PermissionDenied {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "permission denied on the control socket {}: only root may talk to a running tproxy",
            self.path.display()
        )
    }
}

impl std::error::Error for PermissionDenied {}

/// Connects to the control socket of the instance for `table`. `Ok(None)`: there is none, or
/// nothing listens on it; refused for lack of permission is an error ([`PermissionDenied`]),
/// not "nothing there".
fn connect(table: u32) -> Result<Option<UnixStream>> {
    let path = socket_path(table)?;
    match UnixStream::connect(&path) {
        Ok(stream) => Ok(Some(stream)),
        Err(error) if error.kind() == std::io::ErrorKind::PermissionDenied => {
            Err(PermissionDenied { path }.into())
        }
        Err(_) => Ok(None),
    }
}
