//! The UDP relay. A steered datagram that has no session yet arrives on the transparent UDP
//! listener, with its original destination in a control message. Each (client, original
//! destination) pair gets a session of two sockets:
//!
//! - `upstream`, connected to the original destination (or `--upstream`), carries the
//!   client's datagrams onward and receives the replies;
//! - `reply`, a transparent socket bound to the original destination's address and port and
//!   connected to the client, sends the replies from where the client expects them. Once
//!   connected it gets tproxy's socket mark, and from then on the eBPF program's UDP socket
//!   match assigns the client's later datagrams straight to it, bypassing the listener.
//!
//! When the reply socket cannot be bound (a local socket holds that port without
//! SO_REUSEADDR), replies are sent as raw packets with the right source instead, and the
//! client's datagrams keep arriving on the listener. A reply the raw path cannot send is
//! counted and logged.

mod batch;
mod raw_reply;

use std::{
    collections::HashMap,
    io,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    os::fd::AsFd,
    sync::{
        atomic::{AtomicU64, Ordering::Relaxed},
        Arc, Mutex,
    },
    time::{Duration, Instant},
};

use socket2::{Domain, Socket, Type};
use tokio::{io::Interest, net::UdpSocket};
use tokio_util::{sync::CancellationToken, task::TaskTracker};

use raw_reply::RawReplier;

use crate::relay::tcp::Upstream;

/// How long a failed reply-socket bind is remembered before it is tried again for the same
/// original destination.
const UNBINDABLE_FOR: Duration = Duration::from_secs(10);
/// At most one log line per this interval for each kind of repeated trouble.
const LOG_INTERVAL: Duration = Duration::from_secs(10);

/// How datagrams are relayed.
#[derive(Debug)]
pub(crate) struct UdpConfig {
    pub idle_timeout: Duration,
    pub max_sessions: usize,
    /// Most sessions of one client address, so that one client's many source ports cannot
    /// take the overall cap that other clients need.
    pub max_sessions_per_source: usize,
    /// SO_MARK of our per-flow sockets, which the eBPF program trusts.
    pub socket_mark: u32,
    /// All our listeners' addresses: relaying to one of them would loop forever. Updated
    /// when a reload adds or removes listeners.
    pub own_listeners: Arc<std::sync::RwLock<Vec<SocketAddr>>>,
}

/// Counts since start (and the active-session gauge), for logs.
#[derive(Debug, Default)]
pub(crate) struct UdpStats {
    pub active: AtomicU64,
    pub created: AtomicU64,
    pub expired: AtomicU64,
    pub refused_at_cap: AtomicU64,
    /// Datagrams refused because of their original destination (see
    /// [`crate::relay::listener::refused_destination`]).
    pub refused_destinations: AtomicU64,
    /// New flows refused because their client address had `max_sessions_per_source`.
    pub refused_at_source_cap: AtomicU64,
    pub upstream_errors: AtomicU64,
    pub reply_fallbacks: AtomicU64,
    pub to_upstream: AtomicU64,
    pub to_client: AtomicU64,
    pub dropped: AtomicU64,
    /// Replies the raw fallback could not send (also counted in `dropped`).
    pub raw_reply_failures: AtomicU64,
    /// Datagrams the listeners' receive buffers had no room for (new flows' datagrams lost
    /// in a burst before the relay read them).
    pub listener_buffer_drops: AtomicU64,
}

impl UdpStats {
    /// The totals now.
    pub(crate) fn snapshot(&self) -> crate::stats::UdpRelay {
        crate::stats::UdpRelay {
            active: self.active.load(Relaxed),
            created: self.created.load(Relaxed),
            expired: self.expired.load(Relaxed),
            refused_at_cap: self.refused_at_cap.load(Relaxed),
            refused_at_source_cap: self.refused_at_source_cap.load(Relaxed),
            ended_by_upstream_error: self.upstream_errors.load(Relaxed),
            raw_reply_fallbacks: self.reply_fallbacks.load(Relaxed),
            refused_destination: self.refused_destinations.load(Relaxed),
            to_upstream: self.to_upstream.load(Relaxed),
            to_client: self.to_client.load(Relaxed),
            dropped: self.dropped.load(Relaxed),
            listener_buffer_drops: self.listener_buffer_drops.load(Relaxed),
            raw_reply_failures: self.raw_reply_failures.load(Relaxed),
        }
    }
}

type SessionKey = (SocketAddr, SocketAddr);

/// The relay's shared state: listeners and sessions all hold it.
pub(crate) struct UdpRelay {
    config: UdpConfig,
    pub stats: UdpStats,
    sessions: Mutex<HashMap<SessionKey, Arc<Session>>>,
    /// Sessions per client address.
    per_source: Mutex<HashMap<IpAddr, usize>>,
    raw: RawReplier,
    /// Original destinations whose reply-socket bind failed recently, and until when.
    unbindable: Mutex<HashMap<SocketAddr, Instant>>,
    cap_log: LogLimiter,
    source_cap_log: LogLimiter,
    overflow_log: LogLimiter,
    trouble_log: LogLimiter,
    raw_reply_log: LogLimiter,
    /// Timestamps are kept as milliseconds since this instant, in atomics.
    epoch: Instant,
    shutdown: CancellationToken,
    tasks: TaskTracker,
}

struct Session {
    client: SocketAddr,
    original: SocketAddr,
    upstream: UdpSocket,
    /// `None`: replies go through [`RawReplier`].
    reply: Option<UdpSocket>,
    last_activity_ms: AtomicU64,
    /// Cancelled when the upstream reports an error (ICMP unreachable and the like).
    ended: CancellationToken,
}

impl UdpRelay {
    pub(crate) fn new(config: UdpConfig, shutdown: CancellationToken, tasks: TaskTracker) -> Self {
        UdpRelay {
            config,
            stats: UdpStats::default(),
            sessions: Mutex::default(),
            per_source: Mutex::default(),
            raw: RawReplier::default(),
            unbindable: Mutex::default(),
            cap_log: LogLimiter::default(),
            source_cap_log: LogLimiter::default(),
            overflow_log: LogLimiter::default(),
            trouble_log: LogLimiter::default(),
            raw_reply_log: LogLimiter::default(),
            epoch: Instant::now(),
            shutdown,
            tasks,
        }
    }

    /// Receives steered datagrams on `listener` until `stop_receiving` (a reload removed the
    /// listener; its sessions live on) or shutdown. New sessions go to `upstream`.
    pub(crate) async fn serve(
        self: Arc<Self>,
        listener: std::net::UdpSocket,
        upstream: Upstream,
        stop_receiving: CancellationToken,
    ) {
        let listener = match UdpSocket::from_std(listener) {
            Ok(listener) => listener,
            Err(error) => {
                log::error!("UDP listener: {error}");
                return;
            }
        };
        // The listener's drop counter (SO_RXQ_OVFL) counts from its creation.
        let mut overflows_seen = 0;
        loop {
            tokio::select! {
                () = self.shutdown.cancelled() => return,
                () = stop_receiving.cancelled() => return,
                ready = listener.readable() => if let Err(error) = ready {
                    log::error!("UDP listener: {error}");
                    return;
                },
            }
            let received = listener.try_io(Interest::READABLE, || {
                let upstream = *upstream.read().unwrap();
                batch::recv_steered(listener.as_fd(), |client, original, payload| {
                    self.on_steered(client, original, upstream, payload)
                })
            });
            match received {
                Ok(Some(overflows)) => {
                    self.count_listener_overflows(&mut overflows_seen, overflows);
                }
                Ok(None) => {}
                Err(error) if error.kind() == io::ErrorKind::WouldBlock => {}
                Err(error) => log::warn!("UDP listener: {error}"),
            }
        }
    }

    /// Whether some session moved a datagram within the last `window`: a stop waits for
    /// those (a reply may be on its way), not for sessions that merely have not expired.
    pub(crate) fn busy_within(&self, window: Duration) -> bool {
        let now = self.now_ms();
        let window = u64::try_from(window.as_millis()).unwrap_or(u64::MAX);
        self.sessions
            .lock()
            .unwrap()
            .values()
            .any(|session| now.saturating_sub(session.last_activity_ms.load(Relaxed)) < window)
    }

    fn now_ms(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }

    fn on_steered(
        self: &Arc<Self>,
        client: SocketAddr,
        original: SocketAddr,
        upstream: Option<SocketAddr>,
        payload: &[u8],
    ) {
        let existing = self
            .sessions
            .lock()
            .unwrap()
            .get(&(client, original))
            .cloned();
        let Some(session) = existing.or_else(|| self.open_session(client, original, upstream))
        else {
            return;
        };
        // A direct send, not tokio's try_send: a socket tokio has not yet seen writable would
        // refuse without trying.
        match batch::send(session.upstream.as_fd(), &[payload]) {
            Ok(_) => {
                self.stats.to_upstream.fetch_add(1, Relaxed);
                session.last_activity_ms.store(self.now_ms(), Relaxed);
            }
            Err(error) if error.kind() == io::ErrorKind::WouldBlock => {
                self.stats.dropped.fetch_add(1, Relaxed);
            }
            Err(error) => {
                log::debug!("{client} -> {original}: upstream: {error}");
                self.stats.upstream_errors.fetch_add(1, Relaxed);
                session.ended.cancel();
            }
        }
    }

    fn open_session(
        self: &Arc<Self>,
        client: SocketAddr,
        original: SocketAddr,
        upstream: Option<SocketAddr>,
    ) -> Option<Arc<Session>> {
        let target = upstream.unwrap_or(original);
        let loops = {
            let own_listeners = self.config.own_listeners.read().unwrap();
            crate::config::reaches_own_listener(&own_listeners, target)
        };
        if loops {
            if self.trouble_log.allow() {
                log::warn!(
                    "{client} -> {original}: refusing to relay to our own listener {target}"
                );
            }
            return None;
        }
        if crate::relay::listener::refused_destination(original, client) {
            self.stats.refused_destinations.fetch_add(1, Relaxed);
            if self.trouble_log.allow() {
                log::warn!(
                    "{client} -> {original}: refusing to relay to a loopback, unspecified, \
                     mapped, multicast or link-local address"
                );
            }
            return None;
        }
        // Per source first: a client at its own cap must not count against the overall one.
        if !self.source_has_room(client) {
            return None;
        }
        if self.sessions.lock().unwrap().len() >= self.config.max_sessions {
            self.stats.refused_at_cap.fetch_add(1, Relaxed);
            if self.cap_log.allow() {
                log::warn!(
                    "UDP session cap ({}) reached: dropping datagrams of new flows ({} so far)",
                    self.config.max_sessions,
                    self.stats.refused_at_cap.load(Relaxed)
                );
            }
            return None;
        }
        let upstream = match connect_upstream(target, self.config.socket_mark) {
            Ok(upstream) => upstream,
            Err(error) => {
                self.stats.upstream_errors.fetch_add(1, Relaxed);
                if self.trouble_log.allow() {
                    log::warn!("{client} -> {original}: upstream {target}: {error}");
                }
                return None;
            }
        };
        let reply = self.reply_socket(original, client);
        if reply.is_none() {
            self.stats.reply_fallbacks.fetch_add(1, Relaxed);
        }
        let session = Arc::new(Session {
            client,
            original,
            upstream,
            reply,
            last_activity_ms: AtomicU64::new(self.now_ms()),
            ended: CancellationToken::new(),
        });
        self.sessions
            .lock()
            .unwrap()
            .insert((client, original), session.clone());
        self.count_source(client.ip(), true);
        self.stats.created.fetch_add(1, Relaxed);
        self.stats.active.fetch_add(1, Relaxed);
        log::debug!("{client} -> {original}: new UDP session via {target}");
        self.tasks.spawn(self.clone().run_session(session.clone()));
        Some(session)
    }

    /// A transparent socket sending from `original` to `client`, or `None` to fall back to
    /// raw replies.
    fn reply_socket(&self, original: SocketAddr, client: SocketAddr) -> Option<UdpSocket> {
        let now = Instant::now();
        {
            let mut unbindable = self.unbindable.lock().unwrap();
            unbindable.retain(|_, until| *until > now);
            if unbindable.contains_key(&original) {
                return None;
            }
        }
        match bind_reply_socket(original, client, self.config.socket_mark) {
            Ok(socket) => Some(socket),
            Err(error) => {
                self.unbindable
                    .lock()
                    .unwrap()
                    .insert(original, now + UNBINDABLE_FOR);
                if self.trouble_log.allow() {
                    log::warn!(
                        "cannot bind a reply socket to {original} ({error}): replying through a raw socket"
                    );
                }
                None
            }
        }
    }

    async fn run_session(self: Arc<Self>, session: Arc<Session>) {
        let idle = self.config.idle_timeout;
        loop {
            let last = Duration::from_millis(session.last_activity_ms.load(Relaxed));
            let deadline = self.epoch + last + idle;
            let client_readable = async {
                match &session.reply {
                    Some(reply) => reply.readable().await,
                    None => std::future::pending().await,
                }
            };
            let moved = tokio::select! {
                () = self.shutdown.cancelled() => break,
                () = session.ended.cancelled() => break,
                () = tokio::time::sleep_until(deadline.into()) => {
                    if Instant::now() >= deadline {
                        self.stats.expired.fetch_add(1, Relaxed);
                        log::debug!("{} -> {}: UDP session idle for {idle:?}", session.client, session.original);
                        break;
                    }
                    continue;
                }
                // An ICMP error (port unreachable) shows as an error condition, not as
                // readability: UDP's poll reports no EPOLLIN for it.
                ready = session.upstream.ready(Interest::READABLE | Interest::ERROR) => match ready {
                    Ok(ready) if ready.is_error() => upstream_error(&session.upstream),
                    Ok(_) => self.upstream_to_client(&session),
                    Err(error) => Err(error),
                },
                ready = client_readable => ready.and_then(|()| self.client_to_upstream(&session)),
            };
            match moved {
                Ok(()) => {}
                Err(error) if error.kind() == io::ErrorKind::WouldBlock => {}
                Err(error) => {
                    self.stats.upstream_errors.fetch_add(1, Relaxed);
                    log::debug!(
                        "{} -> {}: UDP session ended: {error}",
                        session.client,
                        session.original
                    );
                    break;
                }
            }
        }
        self.sessions
            .lock()
            .unwrap()
            .remove(&(session.client, session.original));
        self.count_source(session.client.ip(), false);
        self.stats.active.fetch_sub(1, Relaxed);
    }

    fn upstream_to_client(&self, session: &Session) -> io::Result<()> {
        let upstream = &session.upstream;
        upstream.try_io(Interest::READABLE, || {
            batch::recv(upstream.as_fd(), |replies| {
                let sent = match &session.reply {
                    Some(reply) => batch::send(reply.as_fd(), replies).unwrap_or(0),
                    None => replies
                        .iter()
                        .filter(|reply| self.send_raw_reply(session, reply))
                        .count(),
                };
                self.count_moved(session, &self.stats.to_client, replies.len(), sent);
            })
        })
    }

    /// Sends one reply through the raw fallback; one it cannot send is counted and logged.
    fn send_raw_reply(&self, session: &Session, reply: &[u8]) -> bool {
        let Err(error) = self.raw.send(session.original, session.client, reply) else {
            return true;
        };
        let failures = self.stats.raw_reply_failures.fetch_add(1, Relaxed) + 1;
        if self.raw_reply_log.allow() {
            log::warn!(
                "{} -> {}: a reply of {} bytes could not be sent through the raw socket: {error} \
                 ({failures} raw replies lost so far)",
                session.client,
                session.original,
                reply.len()
            );
        }
        false
    }

    fn client_to_upstream(&self, session: &Session) -> io::Result<()> {
        let Some(reply) = &session.reply else {
            return Ok(());
        };
        reply.try_io(Interest::READABLE, || {
            batch::recv(reply.as_fd(), |datagrams| {
                batch::send(session.upstream.as_fd(), datagrams).map(|sent| {
                    self.count_moved(session, &self.stats.to_upstream, datagrams.len(), sent)
                })
            })?
        })
    }

    /// Adds the datagrams a listener dropped since `seen` (its counter when last looked at),
    /// and logs them (at most once per [`LOG_INTERVAL`]).
    fn count_listener_overflows(&self, seen: &mut u32, overflows: u32) {
        let new = overflows.wrapping_sub(*seen);
        *seen = overflows;
        if new == 0 {
            return;
        }
        let total = self
            .stats
            .listener_buffer_drops
            .fetch_add(u64::from(new), Relaxed)
            + u64::from(new);
        if self.overflow_log.allow() {
            log::warn!(
                "UDP listener: {new} steered datagrams dropped for want of receive buffer \
                 ({total} so far): a burst outran the relay"
            );
        }
    }

    /// Whether `client`'s address may open another session; counts and logs (at most once
    /// per [`LOG_INTERVAL`]) a refusal.
    fn source_has_room(&self, client: SocketAddr) -> bool {
        let sessions = self
            .per_source
            .lock()
            .unwrap()
            .get(&client.ip())
            .copied()
            .unwrap_or(0);
        if sessions < self.config.max_sessions_per_source || !super::capped_per_source(client.ip())
        {
            return true;
        }
        self.stats.refused_at_source_cap.fetch_add(1, Relaxed);
        if self.source_cap_log.allow() {
            log::warn!(
                "{}: UDP session cap per source ({}) reached: dropping datagrams of its new flows \
                 ({} so far, all sources)",
                client.ip(),
                self.config.max_sessions_per_source,
                self.stats.refused_at_source_cap.load(Relaxed)
            );
        }
        false
    }

    /// Counts a session of `source` opened (`true`) or ended.
    fn count_source(&self, source: IpAddr, opened: bool) {
        let mut per_source = self.per_source.lock().unwrap();
        let count = per_source.entry(source).or_default();
        match opened {
            true => *count += 1,
            false => *count = count.saturating_sub(1),
        }
        if *count == 0 {
            per_source.remove(&source);
        }
    }

    fn count_moved(&self, session: &Session, direction: &AtomicU64, received: usize, sent: usize) {
        direction.fetch_add(sent as u64, Relaxed);
        self.stats
            .dropped
            .fetch_add((received - sent) as u64, Relaxed);
        session.last_activity_ms.store(self.now_ms(), Relaxed);
    }
}

/// The pending error of an upstream socket, which ends its session. If another call already
/// consumed it, the stale error readiness is cleared and the session goes on.
fn upstream_error(upstream: &UdpSocket) -> io::Result<()> {
    match upstream.take_error()? {
        Some(error) => Err(error),
        None => {
            let _ = upstream.try_io(Interest::ERROR, || {
                Err::<(), _>(io::ErrorKind::WouldBlock.into())
            });
            Ok(())
        }
    }
}

fn unspecified(like: SocketAddr) -> SocketAddr {
    match like.ip() {
        IpAddr::V4(_) => (Ipv4Addr::UNSPECIFIED, 0).into(),
        IpAddr::V6(_) => (Ipv6Addr::UNSPECIFIED, 0).into(),
    }
}

/// The session's socket towards `target`, marked so that the program never steers what it
/// sends (should its path come back in through a steered interface, e.g. `lo`).
fn connect_upstream(target: SocketAddr, mark: u32) -> io::Result<UdpSocket> {
    let socket = Socket::new(Domain::for_address(target), Type::DGRAM, None)?;
    socket.set_mark(mark)?;
    socket.bind(&unspecified(target).into())?;
    socket.connect(&target.into())?;
    socket.set_nonblocking(true)?;
    UdpSocket::from_std(socket.into())
}

fn bind_reply_socket(original: SocketAddr, client: SocketAddr, mark: u32) -> io::Result<UdpSocket> {
    let socket = Socket::new(Domain::for_address(original), Type::DGRAM, None)?;
    match original {
        SocketAddr::V4(_) => socket.set_ip_transparent_v4(true)?,
        SocketAddr::V6(_) => {
            socket.set_only_v6(true)?;
            socket.set_ip_transparent_v6(true)?;
        }
    }
    // Sessions of several clients to one destination each bind its address and port.
    socket.set_reuse_address(true)?;
    socket.set_nonblocking(true)?;
    socket.bind(&original.into())?;
    socket.connect(&client.into())?;
    // Only now, connected to its own client, may the eBPF program find and trust it: marked
    // any earlier, the bound-but-unconnected socket would match other clients' datagrams.
    socket.set_mark(mark)?;
    UdpSocket::from_std(socket.into())
}

/// Lets one message through per [`LOG_INTERVAL`].
/// Lets a repetitive log line through at most once per `LOG_INTERVAL`.
#[derive(Default)]
pub(crate) struct LogLimiter {
    last: Mutex<Option<Instant>>,
}

impl LogLimiter {
    pub(crate) fn allow(&self) -> bool {
        let mut last = self.last.lock().unwrap();
        let now = Instant::now();
        if last.is_some_and(|at| now.duration_since(at) < LOG_INTERVAL) {
            return false;
        }
        *last = Some(now);
        true
    }
}
