//! The relay: accept a steered connection, learn where the client meant to go, connect there
//! (or to the fixed upstream), and move bytes both ways until both sides are done.
//!
//! A steered connection's local address *is* its original destination: `bpf_sk_assign`
//! handed the SYN to our listener unchanged, so the accepted socket was created for the
//! client's own (source, destination) tuple.

use std::{
    collections::HashMap,
    io,
    net::IpAddr,
    net::SocketAddr,
    sync::{
        atomic::{AtomicU64, AtomicUsize, Ordering::Relaxed},
        Arc, Mutex, RwLock,
    },
    time::{Duration, Instant},
};

use tokio::{
    net::{TcpListener, TcpStream},
    time::timeout,
};
use tokio_util::{sync::CancellationToken, task::TaskTracker};

use crate::{
    config::reaches_own_listener,
    logging,
    relay::kernel::{self, KernelRelay, PairError},
    relay::listener,
    relay::splice::{self, PipePool},
    relay::udp::LogLimiter,
    values::{Human, TcpRelayMode},
};

/// Pipes for splicing, shared by every connection.
static PIPES: PipePool = PipePool::new();
/// How long to wait before accepting again after the process ran out of descriptors.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

/// Upper bounds of the connect latency buckets, in seconds.
const CONNECT_BUCKETS: [f64; 12] = [
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5, 2.5,
];

/// A histogram of upstream connect latency (seconds), observed by the relay.
pub(crate) fn connect_latency() -> prometheus_client::metrics::histogram::Histogram {
    prometheus_client::metrics::histogram::Histogram::new(CONNECT_BUCKETS)
}

/// How connections are relayed, for every listener.
#[derive(Debug)]
pub(crate) struct RelayConfig {
    pub connect_timeout: Duration,
    pub idle_timeout: Duration,
    /// How long one direction may stay open after the other has ended (half-close).
    pub half_close_timeout: Duration,
    /// Most connections relayed at once, overall and from one client address.
    pub max_connections: usize,
    pub max_connections_per_source: usize,
    /// Connect to the upstream from the client's address instead of this host's.
    pub transparent_upstream: bool,
    /// SO_MARK of upstream sockets: the program passes packets carrying it.
    pub socket_mark: u32,
    /// Seconds each successful upstream connect took.
    pub connect_latency: prometheus_client::metrics::histogram::Histogram,
    /// All our listeners' addresses: relaying to one of them would loop forever. Updated
    /// when a reload adds or removes listeners.
    pub own_listeners: Arc<RwLock<Vec<SocketAddr>>>,
    /// How bytes are moved; with [`TcpRelayMode::Kernel`], `kernel` is loaded.
    pub mode: TcpRelayMode,
    pub kernel: Option<Arc<KernelRelay>>,
}

/// A listener's fixed destination for every connection (`None`: each connection's original
/// destination), changed in place by a reload.
pub(crate) type Upstream = Arc<RwLock<Option<SocketAddr>>>;

/// Totals across all connections, for the shutdown summary.
#[derive(Default)]
pub(crate) struct RelayStats {
    pub accepted: AtomicU64,
    pub upstream_failures: AtomicU64,
    pub bytes_to_upstream: AtomicU64,
    pub bytes_to_client: AtomicU64,
    /// Connections refused (reset at once) because `max_connections` were being relayed.
    pub refused_at_limit: AtomicU64,
    /// Connections refused because their client address had `max_connections_per_source`.
    pub refused_at_source_limit: AtomicU64,
    /// Connections reset because one direction stayed open `half_close_timeout` after the
    /// other ended.
    pub half_close_timeouts: AtomicU64,
    /// Connections reset because their original destination is one no relay may connect to
    /// (see [`crate::relay::listener::refused_destination`]).
    pub refused_destinations: AtomicU64,
    /// Connections relayed by the kernel (`--tcp-relay kernel`).
    pub kernel_relayed: AtomicU64,
    /// Connections the kernel relay could not take: spliced instead (or reset, if bytes may
    /// have been dropped while only one side was in its map).
    pub kernel_fallbacks: AtomicU64,
    /// The kernel relay, when in use, for the count of its map's entries.
    pub kernel: std::sync::OnceLock<Arc<KernelRelay>>,
    admission: Admission,
}

impl RelayStats {
    /// Connections being relayed now.
    pub(crate) fn active(&self) -> usize {
        self.admission.active.load(Relaxed)
    }

    /// The totals now.
    pub(crate) fn snapshot(&self) -> crate::stats::TcpRelay {
        crate::stats::TcpRelay {
            accepted: self.accepted.load(Relaxed),
            active: self.active() as u64,
            upstream_failures: self.upstream_failures.load(Relaxed),
            bytes_to_upstream: self.bytes_to_upstream.load(Relaxed),
            bytes_to_client: self.bytes_to_client.load(Relaxed),
            refused_at_limit: self.refused_at_limit.load(Relaxed),
            refused_at_source_limit: self.refused_at_source_limit.load(Relaxed),
            half_close_timeouts: self.half_close_timeouts.load(Relaxed),
            refused_destination: self.refused_destinations.load(Relaxed),
            kernel_relayed: self.kernel_relayed.load(Relaxed),
            kernel_fallbacks: self.kernel_fallbacks.load(Relaxed),
            kernel_map_entries: self.kernel.get().map_or(0, |relay| relay.entries() as u64),
        }
    }
}

/// Who is being relayed: the overall count and the count per client address.
#[derive(Default)]
struct Admission {
    active: AtomicUsize,
    per_source: Mutex<HashMap<IpAddr, usize>>,
    refusal_log: LogLimiter,
}

/// A connection's place in [`Admission`], given back when dropped.
struct Admitted {
    stats: Arc<RelayStats>,
    source: IpAddr,
}

impl Drop for Admitted {
    fn drop(&mut self) {
        let admission = &self.stats.admission;
        admission.active.fetch_sub(1, Relaxed);
        let mut per_source = admission.per_source.lock().unwrap();
        if let Some(count) = per_source.get_mut(&self.source) {
            *count -= 1;
            if *count == 0 {
                per_source.remove(&self.source);
            }
        }
    }
}

/// Admits a connection from `source`, or says which limit refuses it. Per source first: a
/// client at its own limit must not use up the overall one that other clients need.
fn admit(
    stats: &Arc<RelayStats>,
    config: &RelayConfig,
    source: IpAddr,
) -> Result<Admitted, &'static str> {
    let admission = &stats.admission;
    let mut per_source = admission.per_source.lock().unwrap();
    let count = per_source.entry(source).or_default();
    if *count >= config.max_connections_per_source && super::capped_per_source(source) {
        if *count == 0 {
            per_source.remove(&source);
        }
        stats.refused_at_source_limit.fetch_add(1, Relaxed);
        return Err("max-connections-per-source");
    }
    if admission.active.load(Relaxed) >= config.max_connections {
        if *count == 0 {
            per_source.remove(&source);
        }
        stats.refused_at_limit.fetch_add(1, Relaxed);
        return Err("max-connections");
    }
    *count += 1;
    admission.active.fetch_add(1, Relaxed);
    Ok(Admitted {
        stats: stats.clone(),
        source,
    })
}

/// Accepts connections until `stop_accepting` (a reload removed the listener) or
/// `shutdown`, relaying each on its own task in `connections`. On `shutdown` the connections
/// in flight are reset on both sides: a relay that just stopped would look to each peer like
/// a clean end of stream, hiding the truncation.
pub(crate) async fn serve(
    listener: TcpListener,
    upstream: Upstream,
    config: Arc<RelayConfig>,
    stats: Arc<RelayStats>,
    stop_accepting: CancellationToken,
    shutdown: CancellationToken,
    connections: TaskTracker,
) {
    loop {
        let accepted = tokio::select! {
            () = shutdown.cancelled() => return,
            () = stop_accepting.cancelled() => return,
            accepted = listener.accept() => accepted,
        };
        let (client, peer) = match accepted {
            Ok(accepted) => accepted,
            Err(error) => {
                // EMFILE/ENFILE and friends: the pending connection stays queued; spinning on
                // accept would only burn the CPU that closing connections need.
                log::warn!(
                    "accept failed: {error}; retrying in {}",
                    Human(ACCEPT_BACKOFF)
                );
                tokio::time::sleep(ACCEPT_BACKOFF).await;
                continue;
            }
        };
        stats.accepted.fetch_add(1, Relaxed);
        let admitted = match admit(&stats, &config, peer.ip()) {
            Ok(admitted) => admitted,
            Err(limit) => {
                if stats.admission.refusal_log.allow() {
                    log::warn!(
                        "{peer}: refused, --{limit} reached ({} refused overall, {} per source so far)",
                        stats.refused_at_limit.load(Relaxed),
                        stats.refused_at_source_limit.load(Relaxed)
                    );
                }
                reset(&client);
                continue;
            }
        };
        let upstream = *upstream.read().unwrap();
        let config = config.clone();
        let stats = stats.clone();
        let shutdown = shutdown.clone();
        connections.spawn(async move {
            relay(client, peer, upstream, &config, &stats, &shutdown).await;
            // The connection's place is given back only once it is fully closed.
            drop(admitted);
        });
    }
}

async fn relay(
    client: TcpStream,
    peer: SocketAddr,
    upstream: Option<SocketAddr>,
    config: &RelayConfig,
    stats: &RelayStats,
    shutdown: &CancellationToken,
) {
    let Some((original, target)) = destination(&client, peer, upstream, config, stats) else {
        return;
    };
    let Some(upstream) = connect_upstream(&client, peer, original, target, config, stats).await
    else {
        return;
    };
    let _ = client.set_nodelay(true);
    log::debug!("{peer} -> {original}: relaying via {target}");

    let traffic = Traffic::default();
    let finished = kernel::Finished::default();
    let Ok(paired) = pair_in_kernel(&client, &upstream, peer, original, config, stats) else {
        return;
    };
    let moving = async {
        match &paired {
            Some(paired) => {
                kernel::watch(
                    &client,
                    &upstream,
                    paired,
                    config.idle_timeout,
                    config.half_close_timeout,
                    &stats.half_close_timeouts,
                    &finished,
                )
                .await
            }
            None => {
                let pipes = (config.mode != TcpRelayMode::Copy).then_some(&PIPES);
                pipe(&client, &upstream, pipes, config, stats, &traffic).await
            }
        }
    };
    let result = tokio::select! {
        result = moving => result,
        () = shutdown.cancelled() => Err(io::Error::new(io::ErrorKind::Interrupted, "tproxy is stopping")),
    };
    let (up, down) = match &paired {
        Some(_) => finished.bytes(&client, &upstream),
        None => (
            traffic.to_upstream.load(Relaxed),
            traffic.to_client.load(Relaxed),
        ),
    };
    // Out of the map before the sockets close.
    drop(paired);
    stats.bytes_to_upstream.fetch_add(up, Relaxed);
    stats.bytes_to_client.fetch_add(down, Relaxed);
    match result {
        Ok(()) => log::debug!("{peer} -> {original}: done, {up} bytes up, {down} bytes down"),
        Err(error) => {
            // Whatever broke one side, the other must learn the stream is gone, not just end.
            reset(&client);
            reset(&upstream);
            log::debug!("{peer} -> {original}: {error} after {up} bytes up, {down} bytes down");
        }
    }
}

/// The connection's original destination and where to connect for it; `None`: refused
/// (the client is reset) or gone.
fn destination(
    client: &TcpStream,
    peer: SocketAddr,
    upstream: Option<SocketAddr>,
    config: &RelayConfig,
    stats: &RelayStats,
) -> Option<(SocketAddr, SocketAddr)> {
    let original = match client.local_addr() {
        Ok(addr) => addr,
        Err(error) => {
            log::debug!("{peer}: connection gone before it could be relayed: {error}");
            return None;
        }
    };
    let target = upstream.unwrap_or(original);
    if reaches_own_listener(&config.own_listeners.read().unwrap(), target) {
        log::warn!(target: logging::PER_FLOW, "{peer} -> {original}: refusing to relay to our own listener {target}");
        reset(client);
        return None;
    }
    if listener::refused_destination(original, peer) {
        stats.refused_destinations.fetch_add(1, Relaxed);
        log::warn!(
            target: logging::PER_FLOW,
            "{peer} -> {original}: refusing to relay to a loopback, unspecified, mapped, \
             multicast or link-local address"
        );
        reset(client);
        return None;
    }
    Some((original, target))
}

/// The upstream connection; `None`: it failed (counted, the client is reset).
async fn connect_upstream(
    client: &TcpStream,
    peer: SocketAddr,
    original: SocketAddr,
    target: SocketAddr,
    config: &RelayConfig,
    stats: &RelayStats,
) -> Option<TcpStream> {
    let source = config.transparent_upstream.then_some(peer.ip());
    let connecting = Instant::now();
    match connect(target, source, config.socket_mark, config.connect_timeout).await {
        Ok(upstream) => {
            config
                .connect_latency
                .observe(connecting.elapsed().as_secs_f64());
            Some(upstream)
        }
        Err(error) => {
            stats.upstream_failures.fetch_add(1, Relaxed);
            log::info!(target: logging::PER_FLOW, "{peer} -> {original}: upstream {target}: {error}; resetting client");
            reset(client);
            None
        }
    }
}

/// In kernel mode, the pair in the kernel's socket map (`Ok(None)`: not kernel mode, or the
/// map refused it and the relay splices). `Err`: pairing broke mid-way, both sides are reset.
fn pair_in_kernel<'a>(
    client: &'a TcpStream,
    upstream: &'a TcpStream,
    peer: SocketAddr,
    original: SocketAddr,
    config: &'a RelayConfig,
    stats: &RelayStats,
) -> Result<Option<kernel::Paired<'a>>, ()> {
    let Some(relay) = &config.kernel else {
        return Ok(None);
    };
    match relay.pair(client, upstream) {
        Ok(paired) => {
            stats.kernel_relayed.fetch_add(1, Relaxed);
            Ok(Some(paired))
        }
        Err(PairError::Refused(error)) => {
            stats.kernel_fallbacks.fetch_add(1, Relaxed);
            log::debug!("{peer} -> {original}: the kernel relay refused it ({error}); splicing");
            Ok(None)
        }
        Err(PairError::Lost(error)) => {
            stats.kernel_fallbacks.fetch_add(1, Relaxed);
            log::info!(target: logging::PER_FLOW, "{peer} -> {original}: the kernel relay failed mid-way ({error}); resetting both sides");
            reset(client);
            reset(upstream);
            Err(())
        }
    }
}

/// Connects to `target`, from the client's own address `source` if given (transparent
/// upstream: IP_TRANSPARENT lets the socket use an address that is not local). The socket
/// carries `mark`, which the program never steers: even if the path to the upstream comes
/// back in through a steered interface (`lo`), the relay cannot re-enter its own steering.
async fn connect(
    target: SocketAddr,
    source: Option<IpAddr>,
    mark: u32,
    limit: Duration,
) -> io::Result<TcpStream> {
    let connecting = async {
        let socket = match target {
            SocketAddr::V4(_) => tokio::net::TcpSocket::new_v4()?,
            SocketAddr::V6(_) => tokio::net::TcpSocket::new_v6()?,
        };
        let raw = socket2::SockRef::from(&socket);
        raw.set_mark(mark)?;
        if let Some(source) = source {
            if source.is_ipv4() != target.is_ipv4() {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!("cannot connect from the client's {source} to {target}: address families differ"),
                ));
            }
            match target {
                SocketAddr::V4(_) => raw.set_ip_transparent_v4(true)?,
                SocketAddr::V6(_) => raw.set_ip_transparent_v6(true)?,
            }
            socket.bind(SocketAddr::new(source, 0))?;
        }
        socket.connect(target).await
    };
    let stream = timeout(limit, connecting).await.map_err(|_| {
        io::Error::new(
            io::ErrorKind::TimedOut,
            format!("no answer within {limit:?}"),
        )
    })??;
    stream.set_nodelay(true)?;
    Ok(stream)
}

/// Closes with RST instead of FIN when the socket is dropped.
fn reset(stream: &TcpStream) {
    let _ = socket2::SockRef::from(stream).set_linger(Some(Duration::ZERO));
}

/// Bytes moved so far and when anything last moved, shared by the two directions.
struct Traffic {
    started: Instant,
    last_activity_ms: AtomicU64,
    to_upstream: AtomicU64,
    to_client: AtomicU64,
}

impl Default for Traffic {
    fn default() -> Self {
        Traffic {
            started: Instant::now(),
            last_activity_ms: AtomicU64::new(0),
            to_upstream: AtomicU64::new(0),
            to_client: AtomicU64::new(0),
        }
    }
}

impl Traffic {
    fn moved(&self, direction: &AtomicU64, bytes: usize) {
        direction.fetch_add(bytes as u64, Relaxed);
        self.touched();
    }

    /// Something happened now (bytes moved, or a side finished sending).
    fn touched(&self) {
        self.last_activity_ms
            .store(self.started.elapsed().as_millis() as u64, Relaxed);
    }

    /// Completes once nothing has moved either way for `limit`.
    async fn idle_for(&self, limit: Duration) {
        loop {
            let last = self.started + Duration::from_millis(self.last_activity_ms.load(Relaxed));
            let deadline = last + limit;
            if Instant::now() >= deadline {
                return;
            }
            tokio::time::sleep_until(deadline.into()).await;
        }
    }
}

/// Moves bytes both ways. When one side finishes sending, that direction is shut down on the
/// other side and the opposite direction keeps running (half-close) for as long as it moves
/// bytes, until it has been quiet for the half-close timeout (a download a client asked for
/// before shutting its side, as `nc -N` does, runs to its end); returns once both are done,
/// on the first error, or when the connection has been idle too long.
async fn pipe(
    client: &TcpStream,
    upstream: &TcpStream,
    pipes: Option<&PipePool>,
    config: &RelayConfig,
    stats: &RelayStats,
    traffic: &Traffic,
) -> io::Result<()> {
    let to_upstream = splice::relay_until_eof(client, upstream, pipes, |bytes| {
        traffic.moved(&traffic.to_upstream, bytes)
    });
    let to_client = splice::relay_until_eof(upstream, client, pipes, |bytes| {
        traffic.moved(&traffic.to_client, bytes)
    });
    tokio::pin!(to_upstream, to_client);
    let (mut up_done, mut down_done) = (false, false);
    while !(up_done && down_done) {
        tokio::select! {
            result = &mut to_upstream, if !up_done => { result?; up_done = true; traffic.touched(); }
            result = &mut to_client, if !down_done => { result?; down_done = true; traffic.touched(); }
            () = traffic.idle_for(config.idle_timeout) => return Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!("idle for {}", Human(config.idle_timeout)),
            )),
            () = traffic.idle_for(config.half_close_timeout), if up_done != down_done => {
                stats.half_close_timeouts.fetch_add(1, Relaxed);
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!("half-closed and quiet for {}", Human(config.half_close_timeout)),
                ));
            }
        }
    }
    Ok(())
}
