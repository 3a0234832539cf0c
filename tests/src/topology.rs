//! The two deployments tproxy is built for, as throwaway namespaces.

use std::net::{IpAddr, SocketAddr};

use anyhow::Result;

use crate::{Netns, Tproxy};

/// client ⇄ router ⇄ server over two veth pairs, IPv4 and IPv6, the router forwarding.
/// tproxy runs on the router, on [`RouterTopology::ROUTER_CLIENT_IFACE`].
pub struct RouterTopology {
    pub client: Netns,
    pub router: Netns,
    pub server: Netns,
}

impl RouterTopology {
    /// The router's interface facing the client: where steering happens.
    pub const ROUTER_CLIENT_IFACE: &'static str = "to-client";
    pub const CLIENT_V4: &'static str = "10.10.1.2";
    pub const CLIENT_V6: &'static str = "fd00:1::2";
    pub const ROUTER_SERVER_SIDE_V4: &'static str = "10.10.2.1";
    pub const ROUTER_SERVER_SIDE_V6: &'static str = "fd00:2::1";
    pub const SERVER_V4: &'static str = "10.10.2.2";
    pub const SERVER_V6: &'static str = "fd00:2::2";
    /// A second address on the server, for prefix tests.
    pub const SERVER_OTHER_V4: &'static str = "10.10.2.3";
    pub const SERVER_OTHER_V6: &'static str = "fd00:2::3";

    pub fn new() -> Result<Self> {
        let topology = RouterTopology {
            client: Netns::new("client")?,
            router: Netns::new("router")?,
            server: Netns::new("server")?,
        };
        let RouterTopology {
            client,
            router,
            server,
        } = &topology;
        client.ip(&[
            "link",
            "add",
            "eth0",
            "type",
            "veth",
            "peer",
            "name",
            "to-client",
            "netns",
            &router.name,
        ])?;
        server.ip(&[
            "link",
            "add",
            "eth0",
            "type",
            "veth",
            "peer",
            "name",
            "to-server",
            "netns",
            &router.name,
        ])?;
        for (netns, iface, addrs) in [
            (client, "eth0", &["10.10.1.2/24", "fd00:1::2/64"][..]),
            (router, "to-client", &["10.10.1.1/24", "fd00:1::1/64"][..]),
            (router, "to-server", &["10.10.2.1/24", "fd00:2::1/64"][..]),
            (
                server,
                "eth0",
                &[
                    "10.10.2.2/24",
                    "fd00:2::2/64",
                    "10.10.2.3/24",
                    "fd00:2::3/64",
                ][..],
            ),
        ] {
            for addr in addrs {
                netns.ip(&["addr", "add", addr, "dev", iface, "nodad"])?;
            }
            netns.ip(&["link", "set", iface, "up"])?;
        }
        client.ip(&["route", "add", "default", "via", "10.10.1.1"])?;
        client.ip(&["-6", "route", "add", "default", "via", "fd00:1::1"])?;
        server.ip(&["route", "add", "default", "via", "10.10.2.1"])?;
        server.ip(&["-6", "route", "add", "default", "via", "fd00:2::1"])?;
        router.sysctl("net.ipv4.ip_forward", "1")?;
        router.sysctl("net.ipv6.conf.all.forwarding", "1")?;
        topology.warm_up();
        Ok(topology)
    }

    fn warm_up(&self) {
        for ip in [
            Self::SERVER_V4,
            Self::SERVER_V6,
            Self::SERVER_OTHER_V4,
            Self::SERVER_OTHER_V6,
        ] {
            warm_up(&self.client, ip);
        }
    }

    /// Starts `tproxy run --iface ROUTER_CLIENT_IFACE ARGS…` on the router.
    pub fn tproxy(&self, args: &[&str]) -> Result<Tproxy> {
        let mut full = vec!["--iface", Self::ROUTER_CLIENT_IFACE];
        full.extend_from_slice(args);
        Tproxy::start(&self.router, &full)
    }

    /// `SERVER_V4:port` or `[SERVER_V6]:port`.
    pub fn server_addr(v6: bool, port: u16) -> SocketAddr {
        let ip: IpAddr = if v6 { Self::SERVER_V6 } else { Self::SERVER_V4 }
            .parse()
            .unwrap();
        SocketAddr::new(ip, port)
    }

    /// The router's address on the server's network: what the server sees when intercepted.
    pub fn router_as_seen_by_server(v6: bool) -> IpAddr {
        if v6 {
            Self::ROUTER_SERVER_SIDE_V6
        } else {
            Self::ROUTER_SERVER_SIDE_V4
        }
        .parse()
        .unwrap()
    }

    /// The client's address: what the server sees when not intercepted.
    pub fn client_ip(v6: bool) -> IpAddr {
        if v6 { Self::CLIENT_V6 } else { Self::CLIENT_V4 }
            .parse()
            .unwrap()
    }
}

/// client ⇄ host over one veth pair: the host-network sidecar case, where tproxy steers an
/// inbound port of the host to a local app.
pub struct SidecarTopology {
    pub client: Netns,
    pub host: Netns,
}

impl SidecarTopology {
    /// The host's interface facing the client.
    pub const HOST_IFACE: &'static str = "eth0";
    pub const HOST_V4: &'static str = "10.20.1.1";
    pub const HOST_V6: &'static str = "fd00:20::1";

    pub fn new() -> Result<Self> {
        let topology = SidecarTopology {
            client: Netns::new("client")?,
            host: Netns::new("host")?,
        };
        let SidecarTopology { client, host } = &topology;
        client.ip(&[
            "link", "add", "eth0", "type", "veth", "peer", "name", "eth0", "netns", &host.name,
        ])?;
        for (netns, addrs) in [
            (client, ["10.20.1.2/24", "fd00:20::2/64"]),
            (host, ["10.20.1.1/24", "fd00:20::1/64"]),
        ] {
            for addr in addrs {
                netns.ip(&["addr", "add", addr, "dev", "eth0", "nodad"])?;
            }
            netns.ip(&["link", "set", "eth0", "up"])?;
        }
        for ip in [Self::HOST_V4, Self::HOST_V6] {
            warm_up(&topology.client, ip);
        }
        Ok(topology)
    }
}

/// The first IPv6 packets through a brand-new topology can be lost while neighbour discovery
/// settles, costing a 1 s SYN retransmission. One refused connection (port 9, where nothing
/// listens) resolves every neighbour on the path before a test starts timing anything.
fn warm_up(from: &Netns, ip: &str) {
    let addr = SocketAddr::new(ip.parse().unwrap(), 9);
    let _ = from.run(move || {
        std::net::TcpStream::connect_timeout(&addr, std::time::Duration::from_secs(3))
    });
}
