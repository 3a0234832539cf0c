//! Moving one direction of a relayed TCP connection: splice(2) from the source socket into a
//! pipe and from the pipe into the destination socket, so the bytes never enter userspace.
//! Pipes are taken from a shared pool for one burst of data and given back once empty, so a
//! connection holds no pipe (and no descriptors beyond its two sockets) while idle. Where
//! splice is refused, or no pipe can be had, the burst is copied through a buffer instead.

use std::{
    io,
    os::fd::{AsFd, OwnedFd},
    sync::Mutex,
};

use nix::{
    errno::Errno,
    fcntl::{fcntl, splice, FcntlArg, OFlag, SpliceFFlags},
    unistd::pipe2,
};
use tokio::{io::Interest, net::TcpStream};

/// Pipe capacity. The default 64 KiB caps each splice at 16 pages. Measured on the bench
/// topology (one iperf3 stream, median of 3): 64 KiB 13.7 Gbit/s, 256 KiB 16.1, 1 MiB 16.4;
/// the copying relay with a 64 KiB buffer 12.3, using about a fifth more CPU per byte.
const PIPE_SIZE: i32 = 256 * 1024;
/// Most bytes one splice call may move (`usize::MAX` is refused with EINVAL).
const SPLICE_CHUNK: usize = PIPE_SIZE as usize;
/// Pipes kept for reuse; more are closed when returned.
const POOL_LIMIT: usize = 256;
/// Buffer for copying (the fallback, and `--tcp-relay copy`).
const COPY_BUFFER: usize = 64 * 1024;

/// An empty pipe: the read end and the write end.
struct Pipe {
    read: OwnedFd,
    write: OwnedFd,
}

impl Pipe {
    fn new() -> io::Result<Pipe> {
        let (read, write) = pipe2(OFlag::O_NONBLOCK | OFlag::O_CLOEXEC)?;
        // A smaller pipe still works; the size is only an optimisation.
        let _ = fcntl(&write, FcntlArg::F_SETPIPE_SZ(PIPE_SIZE));
        Ok(Pipe { read, write })
    }
}

/// Pipes shared by all connections.
pub(crate) struct PipePool {
    idle: Mutex<Vec<Pipe>>,
}

impl PipePool {
    pub(crate) const fn new() -> Self {
        PipePool {
            idle: Mutex::new(Vec::new()),
        }
    }

    fn take(&self) -> io::Result<Pipe> {
        match self.idle.lock().unwrap().pop() {
            Some(pipe) => Ok(pipe),
            None => Pipe::new(),
        }
    }

    /// Returns a pipe that has been drained.
    fn give_back(&self, pipe: Pipe) {
        let mut idle = self.idle.lock().unwrap();
        if idle.len() < POOL_LIMIT {
            idle.push(pipe);
        }
    }
}

/// Moves what `from` sends to `to` until `from` ends its stream, then shuts down `to`'s
/// sending side (half-close); `moved` is told each burst's size. Without `pipes` every burst
/// is copied (`--tcp-relay copy`).
pub(crate) async fn relay_until_eof(
    from: &TcpStream,
    to: &TcpStream,
    pipes: Option<&PipePool>,
    mut moved: impl FnMut(usize),
) -> io::Result<()> {
    let Some(pipes) = pipes else {
        return copy_until_eof(from, to, moved).await;
    };
    let mut splice_refused = false;
    loop {
        from.readable().await?;
        let burst = if splice_refused {
            copy_burst(from, to, &mut vec![0; COPY_BUFFER]).await
        } else {
            match pipes.take() {
                Ok(pipe) => match splice_burst(from, to, &pipe).await {
                    Err(error) if is_splice_refusal(&error) => {
                        splice_refused = true;
                        log::debug!("splice refused ({error}); copying instead");
                        continue;
                    }
                    result => {
                        // A pipe still holding bytes (an error mid-burst) is not reused.
                        let drained = match &result {
                            Ok(_) => true,
                            Err(error) => error.kind() == io::ErrorKind::WouldBlock,
                        };
                        if drained {
                            pipes.give_back(pipe);
                        }
                        result
                    }
                },
                // Out of descriptors for a pipe: this burst is copied.
                Err(_) => copy_burst(from, to, &mut vec![0; COPY_BUFFER]).await,
            }
        };
        match burst {
            Ok(0) => {
                return socket2::SockRef::from(to).shutdown(std::net::Shutdown::Write);
            }
            Ok(bytes) => moved(bytes),
            Err(error) if error.kind() == io::ErrorKind::WouldBlock => {}
            Err(error) => return Err(error),
        }
    }
}

async fn copy_until_eof(
    from: &TcpStream,
    to: &TcpStream,
    mut moved: impl FnMut(usize),
) -> io::Result<()> {
    let mut buffer = vec![0; COPY_BUFFER];
    loop {
        from.readable().await?;
        match copy_burst(from, to, &mut buffer).await {
            Ok(0) => return socket2::SockRef::from(to).shutdown(std::net::Shutdown::Write),
            Ok(bytes) => moved(bytes),
            Err(error) if error.kind() == io::ErrorKind::WouldBlock => {}
            Err(error) => return Err(error),
        }
    }
}

fn is_splice_refusal(error: &io::Error) -> bool {
    matches!(
        error.raw_os_error().map(Errno::from_raw),
        Some(Errno::EINVAL | Errno::ENOSYS | Errno::EOPNOTSUPP)
    )
}

/// One splice from the socket into the pipe, then out of the pipe until it is empty.
/// Returns the bytes moved (0 at end of stream); `WouldBlock` if nothing was ready.
async fn splice_burst(from: &TcpStream, to: &TcpStream, pipe: &Pipe) -> io::Result<usize> {
    let flags = SpliceFFlags::SPLICE_F_MOVE | SpliceFFlags::SPLICE_F_NONBLOCK;
    let filled = from.try_io(Interest::READABLE, || {
        splice(from.as_fd(), None, &pipe.write, None, SPLICE_CHUNK, flags).map_err(io::Error::from)
    })?;
    let mut left = filled;
    while left > 0 {
        to.writable().await?;
        match to.try_io(Interest::WRITABLE, || {
            splice(&pipe.read, None, to.as_fd(), None, left, flags).map_err(io::Error::from)
        }) {
            Ok(drained) => left -= drained,
            Err(error) if error.kind() == io::ErrorKind::WouldBlock => {}
            Err(error) => return Err(error),
        }
    }
    Ok(filled)
}

/// The copying fallback: one read into a buffer, then writes until it is all sent.
async fn copy_burst(from: &TcpStream, to: &TcpStream, buffer: &mut [u8]) -> io::Result<usize> {
    let read = from.try_read(buffer)?;
    let mut sent = 0;
    while sent < read {
        to.writable().await?;
        match to.try_write(&buffer[sent..read]) {
            Ok(written) => sent += written,
            Err(error) if error.kind() == io::ErrorKind::WouldBlock => {}
            Err(error) => return Err(error),
        }
    }
    Ok(read)
}
