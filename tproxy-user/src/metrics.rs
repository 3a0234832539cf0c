//! `--metrics ADDR:PORT`: Prometheus text on `/metrics`, and `/healthz` (the process
//! answers) and `/readyz` (set-up is done and steering is in force) for probes.
//!
//! Counters that already exist (the program's per-CPU counters, the relays' atomics) are read
//! at scrape time by a collector rather than copied into metric objects as they change; only
//! the upstream connect latency is a histogram of its own.

use std::{
    convert::Infallible,
    fmt,
    net::SocketAddr,
    sync::{
        atomic::{AtomicBool, Ordering::Relaxed},
        Arc,
    },
};

use anyhow::{Context, Result};
use http_body_util::Full;
use hyper::{body::Bytes, server::conn::http1, service::service_fn, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeMetric},
    metrics::{counter::ConstCounter, gauge::ConstGauge, histogram::Histogram},
    registry::Registry,
};
use tproxy_common::{decision::Protocol, Outcome};

use crate::{datapath::steering::CounterReader, relay::tcp::RelayStats, relay::udp::UdpRelay};

/// Upper bounds of the connect latency buckets, in seconds.
const CONNECT_BUCKETS: [f64; 12] = [
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5, 2.5,
];

/// A histogram of upstream connect latency (seconds), observed by the relay.
pub fn connect_latency() -> Histogram {
    Histogram::new(CONNECT_BUCKETS)
}

/// What the endpoint reports.
pub struct Sources {
    pub counters: Option<CounterReader>,
    pub tcp: Arc<RelayStats>,
    pub udp: Arc<UdpRelay>,
    pub connect_latency: Histogram,
    /// Set once tproxy is ready (set-up done).
    pub ready: Arc<AtomicBool>,
}

/// A listener that the instance taking over from this one (`run --pin`) can bind as well
/// while this one drains (SO_REUSEPORT: same user only).
fn bind_shared(addr: SocketAddr) -> std::io::Result<tokio::net::TcpListener> {
    let socket = socket2::Socket::new(
        socket2::Domain::for_address(addr),
        socket2::Type::STREAM,
        Some(socket2::Protocol::TCP),
    )?;
    socket.set_reuse_address(true)?;
    socket.set_reuse_port(true)?;
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.listen(1024)?;
    tokio::net::TcpListener::from_std(socket.into())
}

/// Binds the endpoint (so a bad address fails the start) and serves it on a task until
/// `stop` is cancelled.
pub async fn serve(
    addr: SocketAddr,
    sources: Sources,
    stop: tokio_util::sync::CancellationToken,
) -> Result<()> {
    let listener = bind_shared(addr).with_context(|| format!("--metrics {addr}: binding"))?;
    let mut registry = Registry::with_prefix("tproxy");
    registry.register(
        "upstream_connect_seconds",
        "Time to connect to the upstream, successful connections",
        sources.connect_latency.clone(),
    );
    let ready = sources.ready.clone();
    registry.register_collector(Box::new(Snapshot(Arc::new(sources))));
    let registry = Arc::new(registry);
    tokio::spawn(async move {
        loop {
            let accepted = tokio::select! {
                accepted = listener.accept() => accepted,
                _ = stop.cancelled() => return,
            };
            let Ok((stream, _)) = accepted else {
                continue;
            };
            let (registry, ready) = (registry.clone(), ready.clone());
            tokio::spawn(async move {
                let service = service_fn(move |request| {
                    let response = respond(&request, &registry, &ready);
                    async move { Ok::<_, Infallible>(response) }
                });
                let _ = http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    Ok(())
}

fn respond<B>(
    request: &Request<B>,
    registry: &Registry,
    ready: &AtomicBool,
) -> Response<Full<Bytes>> {
    let (status, body) = match request.uri().path() {
        "/metrics" => {
            let mut text = String::new();
            match prometheus_client::encoding::text::encode(&mut text, registry) {
                Ok(()) => (StatusCode::OK, text),
                Err(error) => (StatusCode::INTERNAL_SERVER_ERROR, error.to_string()),
            }
        }
        "/healthz" => (StatusCode::OK, "ok\n".into()),
        "/readyz" if ready.load(Relaxed) => (StatusCode::OK, "ready\n".into()),
        "/readyz" => (
            StatusCode::SERVICE_UNAVAILABLE,
            "not ready: setting up or draining\n".into(),
        ),
        _ => (
            StatusCode::NOT_FOUND,
            "see /metrics, /healthz, /readyz\n".into(),
        ),
    };
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    response
}

/// Reads everything at scrape time.
struct Snapshot(Arc<Sources>);

impl fmt::Debug for Snapshot {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Snapshot").finish_non_exhaustive()
    }
}

fn counter(encoder: &mut DescriptorEncoder, name: &str, help: &str, value: u64) -> fmt::Result {
    let metric = ConstCounter::new(value);
    metric.encode(encoder.encode_descriptor(name, help, None, metric.metric_type())?)
}

fn gauge(encoder: &mut DescriptorEncoder, name: &str, help: &str, value: i64) -> fmt::Result {
    let metric = ConstGauge::new(value);
    metric.encode(encoder.encode_descriptor(name, help, None, metric.metric_type())?)
}

impl Collector for Snapshot {
    fn encode(&self, mut encoder: DescriptorEncoder) -> fmt::Result {
        use std::sync::atomic::Ordering::Relaxed;
        let sources = &self.0;
        if let Some(Ok(counters)) = sources.counters.as_ref().map(CounterReader::read) {
            let mut family = encoder.encode_descriptor(
                "packets",
                "Packets the eBPF program saw, by transport and what it did with them",
                None,
                prometheus_client::metrics::MetricType::Counter,
            )?;
            for protocol in Protocol::ALL {
                for outcome in Outcome::ALL {
                    let labels = [("protocol", protocol.name()), ("outcome", outcome.name())];
                    let value = counters[protocol as usize][outcome as usize];
                    ConstCounter::new(value).encode(family.encode_family(&labels)?)?;
                }
            }
        }
        gauge(
            &mut encoder,
            "ready",
            "1 while serving; 0 while setting up or draining (stopping, or handed over)",
            i64::from(sources.ready.load(Relaxed)),
        )?;
        let tcp = &sources.tcp;
        counter(
            &mut encoder,
            "tcp_connections_accepted",
            "TCP connections accepted by the relay",
            tcp.accepted.load(Relaxed),
        )?;
        gauge(
            &mut encoder,
            "tcp_connections_active",
            "TCP connections being relayed",
            tcp.active() as i64,
        )?;
        let mut family = encoder.encode_descriptor(
            "tcp_connections_failed",
            "TCP connections that ended early, by reason",
            None,
            prometheus_client::metrics::MetricType::Counter,
        )?;
        for (reason, value) in [
            ("upstream_unreachable", tcp.upstream_failures.load(Relaxed)),
            ("refused_at_limit", tcp.refused_at_limit.load(Relaxed)),
            (
                "refused_at_source_limit",
                tcp.refused_at_source_limit.load(Relaxed),
            ),
            ("half_close_timeout", tcp.half_close_timeouts.load(Relaxed)),
            (
                "refused_destination",
                tcp.refused_destinations.load(Relaxed),
            ),
        ] {
            ConstCounter::new(value).encode(family.encode_family(&[("reason", reason)])?)?;
        }
        let mut family = encoder.encode_descriptor(
            "tcp_bytes",
            "Bytes the TCP relay moved, by direction",
            None,
            prometheus_client::metrics::MetricType::Counter,
        )?;
        for (direction, value) in [
            ("to_upstream", tcp.bytes_to_upstream.load(Relaxed)),
            ("to_client", tcp.bytes_to_client.load(Relaxed)),
        ] {
            ConstCounter::new(value).encode(family.encode_family(&[("direction", direction)])?)?;
        }
        let udp = &sources.udp.stats;
        gauge(
            &mut encoder,
            "udp_sessions_active",
            "UDP sessions open",
            udp.active.load(Relaxed) as i64,
        )?;
        let mut family = encoder.encode_descriptor(
            "udp_sessions",
            "UDP sessions, by what happened to them",
            None,
            prometheus_client::metrics::MetricType::Counter,
        )?;
        for (event, value) in [
            ("created", udp.created.load(Relaxed)),
            ("expired", udp.expired.load(Relaxed)),
            ("refused_at_cap", udp.refused_at_cap.load(Relaxed)),
            (
                "refused_at_source_cap",
                udp.refused_at_source_cap.load(Relaxed),
            ),
            ("ended_by_upstream_error", udp.upstream_errors.load(Relaxed)),
            ("raw_reply_fallback", udp.reply_fallbacks.load(Relaxed)),
            (
                "refused_destination",
                udp.refused_destinations.load(Relaxed),
            ),
        ] {
            ConstCounter::new(value).encode(family.encode_family(&[("event", event)])?)?;
        }
        let mut family = encoder.encode_descriptor(
            "udp_datagrams",
            "UDP datagrams the relay moved or dropped",
            None,
            prometheus_client::metrics::MetricType::Counter,
        )?;
        for (direction, value) in [
            ("to_upstream", udp.to_upstream.load(Relaxed)),
            ("to_client", udp.to_client.load(Relaxed)),
            ("dropped", udp.dropped.load(Relaxed)),
            (
                "listener_buffer_drops",
                udp.listener_buffer_drops.load(Relaxed),
            ),
        ] {
            ConstCounter::new(value).encode(family.encode_family(&[("direction", direction)])?)?;
        }
        counter(
            &mut encoder,
            "udp_raw_reply_failures",
            "UDP replies the raw fallback could not send (also counted as dropped)",
            udp.raw_reply_failures.load(Relaxed),
        )?;
        Ok(())
    }
}
