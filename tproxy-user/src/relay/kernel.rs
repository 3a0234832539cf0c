//! The in-kernel relay (`--tcp-relay kernel`): once both sides are connected, the two sockets
//! go into a SOCKHASH whose stream-verdict program (tproxy-ebpf/src/relay.rs) sends whatever
//! one socket receives out of the other, inside the kernel, without waking this process.
//!
//! What is left to userspace is what the kernel does not carry across: a FIN (propagated as
//! shutdown(SHUT_WR) on the peer once the bytes before it are written), a RST or error
//! (both sides reset), and the idle and half-close timeouts. The sockets are watched through
//! an epoll set of their own registered for RDHUP/HUP/ERR only, edge-triggered: the data
//! wake-ups the verdict program's redirects cause carry EPOLLIN and are filtered out by the
//! kernel, so a busy connection costs this process nothing.
//!
//! Byte counts come from TCP_INFO (`tcpi_bytes_received`) when the connection ends rather
//! than from the program: the kernel keeps those counters anyway, so counting costs nothing
//! per packet, where a per-connection map in the program would cost a lookup and an atomic
//! add on every skb of every relayed connection.

use std::{
    io,
    mem::{size_of, MaybeUninit},
    os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd, RawFd},
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering::Relaxed},
        Mutex,
    },
    time::{Duration, Instant},
};

use anyhow::{anyhow, Context, Result};
use aya::{
    maps::{HashMap, MapData, MapError, SockHash},
    programs::SkSkb,
    Ebpf, EbpfLoader,
};
use tokio::{
    io::{unix::AsyncFd, Interest},
    net::TcpStream,
};
use tproxy_common::maps::{self, RelayPeerKey};

use crate::values::Human;

static PROGRAM: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/tproxy-relay-ebpf"));

/// How often a side that sent FIN is checked for its bytes having reached the peer's send
/// queue (they may still sit in the kernel relay's backlog when the FIN is seen).
const FLUSH_POLL: Duration = Duration::from_millis(1);

/// `bpf_map_update_elem` flag: fail if the key is present (cookies are unique, so an entry
/// present means a bug, not a pair to overwrite).
const BPF_NOEXIST: u64 = 1;

/// The verdict program and its socket hash, shared by every kernel-relayed connection.
pub struct KernelRelay {
    peers: Mutex<SockHash<MapData, RelayPeerKey>>,
    /// The sockets whose bytes the program dropped, by their own cookie.
    drops: HashMap<MapData, RelayPeerKey, u8>,
    /// Keeps the program loaded and attached to `peers`.
    _ebpf: Ebpf,
}

impl std::fmt::Debug for KernelRelay {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("KernelRelay")
    }
}

impl KernelRelay {
    /// Loads the verdict program and attaches it to a socket hash with room for
    /// `connections` pairs.
    pub fn load(connections: u32) -> Result<KernelRelay> {
        let mut ebpf = EbpfLoader::new()
            .map_max_entries(maps::RELAY_PEERS, connections.saturating_mul(2).max(2))
            .load(PROGRAM)
            .context("loading the kernel relay's eBPF object")?;
        let peers = ebpf
            .take_map(maps::RELAY_PEERS)
            .ok_or_else(|| anyhow!("map {} missing from the relay object", maps::RELAY_PEERS))?;
        let peers: SockHash<MapData, RelayPeerKey> = SockHash::try_from(peers)?;
        let drops = ebpf
            .take_map(maps::RELAY_DROPS)
            .ok_or_else(|| anyhow!("map {} missing from the relay object", maps::RELAY_DROPS))?;
        let drops = HashMap::try_from(drops)?;
        let name = maps::RELAY_VERDICT_PROGRAM;
        let program: &mut SkSkb = ebpf
            .program_mut(name)
            .ok_or_else(|| anyhow!("program {name} missing from the relay object"))?
            .try_into()
            .context("the relay's verdict program has the wrong type")?;
        program
            .load()
            .context("the kernel's verifier rejected the relay's verdict program")?;
        program
            .attach(peers.fd())
            .context("attaching the verdict program to the relay's socket hash")?;
        Ok(KernelRelay {
            peers: Mutex::new(peers),
            drops,
            _ebpf: ebpf,
        })
    }

    /// Whether the program dropped bytes that either socket of a pair received because the
    /// other was not in the map.
    fn dropped(&self, keys: &[RelayPeerKey; 2]) -> io::Result<bool> {
        for key in keys {
            match self.drops.get(key, 0) {
                Ok(_) => return Ok(true),
                Err(MapError::KeyNotFound) => {}
                Err(error) => return Err(io::Error::other(error)),
            }
        }
        Ok(false)
    }

    /// Sockets in the map now (two a relayed connection): 0 once every connection ended.
    pub fn entries(&self) -> usize {
        self.peers.lock().unwrap().keys().count()
    }

    /// Hands the pair to the kernel. On `Err` nothing of the pair is left in the map, and the
    /// error says whether the connection can still be relayed from userspace.
    pub fn pair<'a>(
        &'a self,
        client: &TcpStream,
        upstream: &TcpStream,
    ) -> Result<Paired<'a>, PairError> {
        let keys = [cookie(client)?, cookie(upstream)?];
        // Before the pair is in the map, so that the descriptor this takes can still be
        // refused without harm (out of descriptors: the connection is spliced instead).
        let epoll = epoll_for(&[client, upstream]).map_err(PairError::Refused)?;
        // Before the pair is in the map: nothing has been relayed into either yet.
        let sent_before = [sent(client)?, sent(upstream)?];
        // While only one socket is in the map, what it receives would have nowhere to go. TCP
        // signals "data ready" (which runs the program) only once SO_RCVLOWAT bytes are
        // queued: held high, arrivals wait in the receive queues until the pair is complete.
        for socket in [client, upstream] {
            set_rcvlowat(socket, libc::c_int::MAX)?;
        }
        let mut peers = self.peers.lock().unwrap();
        // Keyed by the peer's cookie: the program finds where to send a socket's bytes with
        // its own cookie.
        let first = peers.insert(keys[0], upstream.as_raw_fd(), BPF_NOEXIST);
        let second = first.and_then(|()| peers.insert(keys[1], client.as_raw_fd(), BPF_NOEXIST));
        // Only more than half a receive buffer arriving meanwhile could have run the program
        // early (TCP caps SO_RCVLOWAT there). The marks are the pair's own: cookies are never
        // reused, so no other pair's drop can be taken for this one's. Marks that cannot be
        // read are taken for drops: the pair is reset rather than maybe truncated.
        let lost = self.dropped(&keys).unwrap_or(true);
        if second.is_err() || lost {
            let _ = peers.remove(&keys[0]);
            let _ = peers.remove(&keys[1]);
            for socket in [client, upstream] {
                set_rcvlowat(socket, 1)?;
            }
            let error = match second {
                Err(error) => io::Error::other(error),
                Ok(()) => io::Error::other("bytes arrived while the pair was being made"),
            };
            return Err(match lost {
                true => PairError::Lost(error),
                false => PairError::Refused(error),
            });
        }
        drop(peers);
        let paired = Paired {
            relay: self,
            keys,
            epoll,
            sent_before,
        };
        // Setting SO_RCVLOWAT back makes TCP signal "data ready" at once if bytes are queued,
        // so the program takes what arrived before and during the pairing first, in order.
        for socket in [client, upstream] {
            set_rcvlowat(socket, 1)?;
        }
        Ok(paired)
    }
}

/// Why a pair could not be handed to the kernel.
#[derive(Debug)]
pub enum PairError {
    /// Nothing was moved: the connection can be relayed another way.
    Refused(io::Error),
    /// Bytes may have been dropped while only one side was in the map: reset the connection.
    Lost(io::Error),
}

impl From<io::Error> for PairError {
    fn from(error: io::Error) -> Self {
        PairError::Lost(error)
    }
}

/// A pair in the socket hash; takes both entries out when dropped.
pub struct Paired<'a> {
    relay: &'a KernelRelay,
    /// The client's and the upstream's cookies.
    keys: [RelayPeerKey; 2],
    /// The pair's own epoll set (see [`epoll_for`]).
    epoll: OwnedFd,
    /// What each socket had taken to send (see [`sent`]) before the pair was made: the SYN
    /// counts in `tcpi_bytes_acked` on the connecting side.
    sent_before: [u64; 2],
}

impl Drop for Paired<'_> {
    fn drop(&mut self) {
        let mut peers = self.relay.peers.lock().unwrap();
        for key in &self.keys {
            // ENOENT: the kernel took the entry out itself when the socket closed.
            let _ = peers.remove(key);
        }
    }
}

/// Which sides (client, upstream) sent FIN, kept outside the watcher so that the bytes can be
/// counted however the watch ended.
#[derive(Default)]
pub struct Finished([AtomicBool; 2]);

impl Finished {
    /// Bytes the kernel relay received from the client and from the upstream.
    pub fn bytes(&self, client: &TcpStream, upstream: &TcpStream) -> (u64, u64) {
        let received = |index: usize, socket: &TcpStream| {
            tcp_info(socket).map_or(0, |info| {
                // A FIN takes a sequence number, and tcpi_bytes_received counts it.
                let fin = u64::from(self.0[index].load(Relaxed));
                info.tcpi_bytes_received.saturating_sub(fin)
            })
        };
        (received(0, client), received(1, upstream))
    }
}

/// One side of a kernel-relayed connection, as the watcher knows it.
#[derive(Default)]
struct Side {
    /// It sent FIN.
    finished: bool,
    /// Its FIN has been passed on: the other socket's sending side is shut down.
    passed_on: bool,
}

/// Whether exactly one direction has ended (its FIN passed on): the half-close timeout runs.
fn half_closed(sides: &[Side; 2]) -> bool {
    sides[0].passed_on != sides[1].passed_on
}

/// Watches a paired connection until both sides have finished (`Ok`), one fails, or a
/// timeout; `finished` learns which sides sent FIN.
pub async fn watch(
    client: &TcpStream,
    upstream: &TcpStream,
    paired: &Paired<'_>,
    idle_timeout: Duration,
    half_close_timeout: Duration,
    half_close_timeouts: &AtomicU64,
    finished: &Finished,
) -> io::Result<()> {
    let sockets = [client, upstream];
    // SAFETY: `paired` keeps the epoll descriptor open for longer than this future lives.
    let events =
        unsafe { AsyncFd::register_with_interest(paired.epoll.as_fd(), Interest::READABLE) }
            .map_err(io::Error::from)?;
    let mut sides: [Side; 2] = Default::default();
    // When the first side's FIN was passed on: the half-close timeout counts quiet time from
    // then at the earliest.
    let mut half_closed_at = Instant::now();
    loop {
        let flushing = sides.iter().any(|side| side.finished && !side.passed_on);
        tokio::select! {
            guard = events.readable() => {
                let mut guard = guard?;
                note_events(drain(guard.get_inner())?, &sockets, &mut sides, finished)?;
                guard.clear_ready();
            }
            () = tokio::time::sleep(FLUSH_POLL), if flushing => {}
            () = idle_for(&sockets, idle_timeout) => {
                return Err(timed_out("idle", idle_timeout));
            }
            () = quiet_since(&sockets, half_close_timeout, half_closed_at), if half_closed(&sides) => {
                half_close_timeouts.fetch_add(1, Relaxed);
                return Err(timed_out("half-closed and quiet", half_close_timeout));
            }
        }
        let was_half_closed = half_closed(&sides);
        pass_fins_on(&sockets, paired, &mut sides)?;
        if sides.iter().all(|side| side.passed_on) {
            return Ok(());
        }
        if !was_half_closed && half_closed(&sides) {
            half_closed_at = Instant::now();
        }
    }
}

/// Takes in the events of the pair's epoll set: a FIN marks its side finished; an error or a
/// hang-up that no FIN explains ends the watch with it.
fn note_events(
    events: Vec<(usize, u32)>,
    sockets: &[&TcpStream; 2],
    sides: &mut [Side; 2],
    finished: &Finished,
) -> io::Result<()> {
    for (index, event) in events {
        if event & (libc::EPOLLERR as u32) != 0 {
            let error = sockets[index].take_error()?.unwrap_or_else(|| {
                io::Error::new(io::ErrorKind::ConnectionReset, "connection reset")
            });
            return Err(error);
        }
        if event & (libc::EPOLLRDHUP as u32) != 0 {
            sides[index].finished = true;
            finished.0[index].store(true, Relaxed);
        }
        // Both directions closed although only one FIN was seen, or ours was not sent: the
        // socket was torn down under us.
        if event & (libc::EPOLLHUP as u32) != 0 && !sides[1 - index].passed_on {
            return Err(io::Error::new(
                io::ErrorKind::ConnectionReset,
                "connection closed abruptly",
            ));
        }
    }
    Ok(())
}

/// Passes each side's FIN on (shuts the peer's sending side down) once every byte before it
/// is in the peer's send queue: the kernel relay may still hold some when the FIN is seen.
fn pass_fins_on(
    sockets: &[&TcpStream; 2],
    paired: &Paired<'_>,
    sides: &mut [Side; 2],
) -> io::Result<()> {
    for index in 0..2 {
        let peer = 1 - index;
        if !sides[index].finished || sides[index].passed_on {
            continue;
        }
        // The FIN's sequence number is not a byte to pass on.
        let received = tcp_info(sockets[index])?
            .tcpi_bytes_received
            .saturating_sub(1);
        let written = sent(sockets[peer])?.saturating_sub(paired.sent_before[peer]);
        if written >= received {
            socket2::SockRef::from(sockets[peer]).shutdown(std::net::Shutdown::Write)?;
            sides[index].passed_on = true;
        }
    }
    Ok(())
}

fn timed_out(state: &str, limit: Duration) -> io::Error {
    io::Error::new(
        io::ErrorKind::TimedOut,
        format!("{state} for {}", Human(limit)),
    )
}

/// As [`idle_for`], counting from `since` at the earliest: the open direction of a
/// half-closed pair has moved nothing for `limit`.
async fn quiet_since(sockets: &[&TcpStream; 2], limit: Duration, since: Instant) {
    let earliest = since + limit;
    if Instant::now() < earliest {
        tokio::time::sleep_until(earliest.into()).await;
    }
    idle_for(sockets, limit).await
}

/// Completes once neither socket has received data for `limit` (the kernel's own
/// `tcpi_last_data_recv`, so the relay needs no clock of its own per packet).
async fn idle_for(sockets: &[&TcpStream; 2], limit: Duration) {
    loop {
        let quiet = sockets
            .iter()
            .map(|socket| {
                tcp_info(*socket).map_or(Duration::ZERO, |info| {
                    Duration::from_millis(info.tcpi_last_data_recv.into())
                })
            })
            .min()
            .unwrap_or_default();
        if quiet >= limit {
            return;
        }
        tokio::time::sleep(limit - quiet).await;
    }
}

/// An epoll set of its own for the pair, told only of FIN (RDHUP), hang-up and errors,
/// edge-triggered: index 0 is the client, 1 the upstream.
fn epoll_for(sockets: &[&TcpStream; 2]) -> io::Result<OwnedFd> {
    // SAFETY: plain syscall; the result is checked before it is owned.
    let fd = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a fresh descriptor nothing else owns.
    let epoll = unsafe { OwnedFd::from_raw_fd(fd) };
    for (index, socket) in sockets.iter().enumerate() {
        let mut event = libc::epoll_event {
            events: (libc::EPOLLRDHUP | libc::EPOLLET) as u32,
            u64: index as u64,
        };
        // SAFETY: both descriptors are open; `event` outlives the call.
        if unsafe {
            libc::epoll_ctl(
                epoll.as_raw_fd(),
                libc::EPOLL_CTL_ADD,
                socket.as_raw_fd(),
                &mut event,
            )
        } < 0
        {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(epoll)
}

/// The events ready in the pair's epoll set: (socket index, events).
fn drain(epoll: &impl AsRawFd) -> io::Result<Vec<(usize, u32)>> {
    let mut events = [libc::epoll_event { events: 0, u64: 0 }; 4];
    // SAFETY: the buffer holds `events.len()` entries; timeout 0 never blocks.
    let count = unsafe {
        libc::epoll_wait(
            epoll.as_raw_fd(),
            events.as_mut_ptr(),
            events.len() as i32,
            0,
        )
    };
    if count < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(events[..count as usize]
        .iter()
        .map(|event| (event.u64 as usize & 1, event.events))
        .collect())
}

/// Bytes the socket has taken to send: acknowledged plus still queued (SIOCOUTQ).
fn sent(socket: &TcpStream) -> io::Result<u64> {
    let acked = tcp_info(socket)?.tcpi_bytes_acked;
    let mut queued: libc::c_int = 0;
    // SAFETY: SIOCOUTQ writes one int.
    if unsafe { libc::ioctl(socket.as_raw_fd(), libc::TIOCOUTQ, &mut queued) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(acked + queued.max(0) as u64)
}

fn tcp_info(socket: &impl AsRawFd) -> io::Result<libc::tcp_info> {
    getsockopt(socket.as_raw_fd(), libc::IPPROTO_TCP, libc::TCP_INFO)
}

fn cookie(socket: &TcpStream) -> io::Result<RelayPeerKey> {
    getsockopt(socket.as_raw_fd(), libc::SOL_SOCKET, libc::SO_COOKIE)
}

fn set_rcvlowat(socket: &TcpStream, bytes: libc::c_int) -> io::Result<()> {
    // SAFETY: SO_RCVLOWAT reads one int.
    let result = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVLOWAT,
            (&bytes as *const libc::c_int).cast(),
            size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    match result {
        0 => Ok(()),
        _ => Err(io::Error::last_os_error()),
    }
}

/// A plain-data socket option.
fn getsockopt<T: Copy>(fd: RawFd, level: libc::c_int, name: libc::c_int) -> io::Result<T> {
    let mut value = MaybeUninit::<T>::zeroed();
    let mut len = size_of::<T>() as libc::socklen_t;
    // SAFETY: the kernel writes at most `len` bytes into `value`, which is zeroed, and `T`
    // is plain data for which any bytes are valid.
    let result = unsafe { libc::getsockopt(fd, level, name, value.as_mut_ptr().cast(), &mut len) };
    if result < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: see above.
    Ok(unsafe { value.assume_init() })
}
