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
    encoding::{DescriptorEncoder, EncodeMetric, MetricEncoder},
    metrics::{counter::ConstCounter, gauge::ConstGauge, histogram::Histogram, MetricType},
    registry::Registry,
};

use crate::{
    config::Settings,
    datapath::steering::Steering,
    relay::listeners::{self, ListenerBook, Relays},
    stats::{Field, Kind, Stats},
};

/// What the endpoint reports.
pub(crate) struct Sources {
    pub(crate) stats: listeners::Sources,
    pub(crate) connect_latency: Histogram,
    /// Set once tproxy is ready (set-up done).
    pub(crate) ready: Arc<AtomicBool>,
    /// The listeners in force, with their socket-map slots.
    pub(crate) listeners: ListenerBook,
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

/// Starts the endpoint for `relays`, if the settings ask for one.
pub(crate) async fn start(
    relays: &Relays,
    settings: &Settings,
    steering: Option<&Steering>,
) -> Result<()> {
    let Some(addr) = settings.metrics else {
        return Ok(());
    };
    serve(
        addr,
        Sources {
            stats: relays.stats_sources(steering),
            connect_latency: relays.tcp_config.connect_latency.clone(),
            ready: relays.ready.clone(),
            listeners: relays.book.clone(),
        },
        relays.metrics_stop.clone(),
    )
    .await
}

/// Binds the endpoint (so a bad address fails the start) and serves it on a task until
/// `stop` is cancelled.
pub(crate) async fn serve(
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

/// Per listener: what the program did with its new flows, and for a proxy tproxy does not
/// own, whether its sockets are there now.
fn encode_listeners(encoder: &mut DescriptorEncoder, sources: &Sources) -> fmt::Result {
    let listeners = sources.listeners.read().unwrap().clone();
    if let Some((counters, ..)) = &sources.stats.steering {
        let mut family = encoder.encode_descriptor(
            "listener_packets",
            "Packets of new flows the eBPF program handed to a listener (steered_new) or found it absent for (no_listener)",
            None,
            MetricType::Counter,
        )?;
        for (slot, listener) in &listeners {
            let Ok(counts) = counters.listener_counts(*slot) else {
                continue;
            };
            for (outcome, value) in [
                ("steered_new", counts.steered_new),
                ("no_listener", counts.no_listener),
            ] {
                let labels = [("listener", listener.name.as_str()), ("outcome", outcome)];
                ConstCounter::new(value).encode(family.encode_family(&labels)?)?;
            }
        }
    }
    let mut family = encoder.encode_descriptor(
        "external_listener_up",
        "1 while a socket listens at an external proxy's address (2: and it has IP_TRANSPARENT)",
        None,
        MetricType::Gauge,
    )?;
    for (_, listener) in &listeners {
        let Some(external) = &listener.external else {
            continue;
        };
        let presences = crate::relay::external::presences(external, listener.tcp, listener.udp);
        for (addr, transport, presence) in presences {
            let Ok(presence) = presence else { continue };
            let value = i64::from(presence.listening) + i64::from(presence.transparent);
            let address = addr.to_string();
            let transport = match transport {
                crate::values::Transport::Tcp => "tcp",
                crate::values::Transport::Udp => "udp",
            };
            let labels = [
                ("listener", listener.name.as_str()),
                ("address", address.as_str()),
                ("transport", transport),
            ];
            ConstGauge::new(value).encode(family.encode_family(&labels)?)?;
        }
    }
    Ok(())
}

impl Collector for Snapshot {
    fn encode(&self, mut encoder: DescriptorEncoder) -> fmt::Result {
        let sources = &self.0;
        let ready = ConstGauge::new(i64::from(sources.ready.load(Relaxed)));
        ready.encode(encoder.encode_descriptor(
            "ready",
            "1 while serving; 0 while setting up or draining (stopping, or handed over)",
            None,
            ready.metric_type(),
        )?)?;
        encode_listeners(&mut encoder, sources)?;
        encode_stats(&mut encoder, &sources.stats.snapshot())
    }
}

/// Every field of `stats`, one metric family per [`Metric`] in the order they first appear.
fn encode_stats(encoder: &mut DescriptorEncoder, stats: &Stats) -> fmt::Result {
    let fields: Vec<Field> = stats
        .sections()
        .into_iter()
        .flat_map(|section| section.fields)
        .collect();
    let mut done: Vec<&str> = Vec::new();
    for field in &fields {
        let metric = field.metric;
        if done.contains(&metric.name) {
            continue;
        }
        done.push(metric.name);
        let metric_type = match metric.kind {
            Kind::Counter => MetricType::Counter,
            Kind::Gauge => MetricType::Gauge,
        };
        let mut family = encoder.encode_descriptor(metric.name, metric.help, None, metric_type)?;
        for member in fields.iter().filter(|f| f.metric.name == metric.name) {
            let value = member.value;
            if member.labels.is_empty() {
                encode_value(metric.kind, value, family)?;
                break;
            }
            encode_value(metric.kind, value, family.encode_family(&member.labels)?)?;
        }
    }
    Ok(())
}

fn encode_value(kind: Kind, value: u64, encoder: MetricEncoder) -> fmt::Result {
    match kind {
        Kind::Counter => ConstCounter::new(value).encode(encoder),
        Kind::Gauge => ConstGauge::new(value as i64).encode(encoder),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stats;
    use tproxy_common::{decision::Protocol, Outcome};

    #[derive(Debug)]
    struct Fixed(Stats);

    impl Collector for Fixed {
        fn encode(&self, mut encoder: DescriptorEncoder) -> fmt::Result {
            encode_stats(&mut encoder, &self.0)
        }
    }

    /// Users' dashboards query these: the names, types and labels must not change.
    #[test]
    fn every_metric_keeps_its_name_type_and_labels() {
        let mut registry = Registry::with_prefix("tproxy");
        registry.register_collector(Box::new(Fixed(Stats {
            packets: Some(stats::Packets::default()),
            fragment_tracking: Some(stats::FragmentEntries::default()),
            interfaces: Some(stats::InterfaceStats::default()),
            local_origin: Some(stats::LocalOriginStats::default()),
            ..Stats::default()
        })));
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
        let samples: Vec<&str> = text
            .lines()
            .filter(|line| !line.starts_with('#'))
            .map(|line| line.rsplit_once(' ').unwrap().0)
            .collect();
        let expected = [
            "tproxy_tcp_connections_accepted_total",
            "tproxy_tcp_connections_active",
            r#"tproxy_tcp_connections_failed_total{reason="upstream_unreachable"}"#,
            r#"tproxy_tcp_connections_failed_total{reason="refused_at_limit"}"#,
            r#"tproxy_tcp_connections_failed_total{reason="refused_at_source_limit"}"#,
            r#"tproxy_tcp_connections_failed_total{reason="half_close_timeout"}"#,
            r#"tproxy_tcp_connections_failed_total{reason="refused_destination"}"#,
            r#"tproxy_tcp_connections_kernel_total{outcome="relayed"}"#,
            r#"tproxy_tcp_connections_kernel_total{outcome="fallback"}"#,
            "tproxy_tcp_kernel_map_entries",
            r#"tproxy_tcp_bytes_total{direction="to_upstream"}"#,
            r#"tproxy_tcp_bytes_total{direction="to_client"}"#,
            "tproxy_udp_sessions_active",
            r#"tproxy_udp_sessions_total{event="created"}"#,
            r#"tproxy_udp_sessions_total{event="expired"}"#,
            r#"tproxy_udp_sessions_total{event="refused_at_cap"}"#,
            r#"tproxy_udp_sessions_total{event="refused_at_source_cap"}"#,
            r#"tproxy_udp_sessions_total{event="ended_by_upstream_error"}"#,
            r#"tproxy_udp_sessions_total{event="raw_reply_fallback"}"#,
            r#"tproxy_udp_sessions_total{event="refused_destination"}"#,
            r#"tproxy_udp_datagrams_total{direction="to_upstream"}"#,
            r#"tproxy_udp_datagrams_total{direction="to_client"}"#,
            r#"tproxy_udp_datagrams_total{direction="dropped"}"#,
            r#"tproxy_udp_datagrams_total{direction="listener_buffer_drops"}"#,
            "tproxy_udp_raw_reply_failures_total",
            r#"tproxy_packets_total{protocol="other",outcome="steered_new"}"#,
            r#"tproxy_fragment_tracking_entries{map="datagrams"}"#,
            r#"tproxy_fragment_tracking_entries{map="reassembled_flows"}"#,
            "tproxy_interfaces_attached",
            r#"tproxy_interface_events_total{event="attached"}"#,
            r#"tproxy_interface_events_total{event="detached"}"#,
            r#"tproxy_interface_events_total{event="attach_failed"}"#,
            r#"tproxy_local_selection{selected="selections"}"#,
            r#"tproxy_local_selection{selected="cgroups"}"#,
            r#"tproxy_local_selection{selected="uid_ranges"}"#,
            "tproxy_local_cgroup_links",
        ];
        for sample in expected {
            assert!(samples.contains(&sample), "{sample} missing from:\n{text}");
        }
        let packets = samples
            .iter()
            .filter(|s| s.starts_with("tproxy_packets_total{"));
        // Every outcome of every protocol.
        let outcomes = (Protocol::COUNT * Outcome::COUNT) as usize;
        assert_eq!(packets.count(), outcomes, "{text}");
        assert_eq!(samples.len(), expected.len() - 1 + outcomes, "{text}");
        for gauge in [
            "tcp_connections_active",
            "tcp_kernel_map_entries",
            "udp_sessions_active",
        ] {
            assert!(
                text.contains(&format!("# TYPE tproxy_{gauge} gauge\n")),
                "{text}"
            );
        }
    }
}
