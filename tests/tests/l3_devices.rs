//! Interfaces without a link-layer header (tun, WireGuard, PPP): tc ingress sees their packets
//! at the IP header, and tproxy steers them as it does Ethernet frames. WireGuard, ipip and
//! GRE links cannot be made in this kernel; two tun devices, one in the client's namespace
//! and one on the router, with this process carrying the packets between them, stand in for
//! a tunnel.

use std::{
    fs::File,
    io::{Read, Write},
    os::fd::AsRawFd,
    thread,
};

use tproxy_tests::{
    peer_seen_by, require_root, udp_client, udp_exchange, Netns, RouterTopology as Topo, Server,
    Tproxy, UdpEcho,
};

/// Creates the tun device `name` in `netns` (gone when the returned file is closed).
fn open_tun(netns: &Netns, name: &'static str) -> File {
    netns.run(move || {
        let tun = File::options()
            .read(true)
            .write(true)
            .open("/dev/net/tun")
            .expect("opening /dev/net/tun");
        // struct ifreq: the name, then the flags (a short).
        let mut request = [0u8; 40];
        request[..name.len()].copy_from_slice(name.as_bytes());
        let flags = (libc::IFF_TUN | libc::IFF_NO_PI) as i16;
        request[16..18].copy_from_slice(&flags.to_ne_bytes());
        // SAFETY: TUNSETIFF reads and writes a struct ifreq, which `request` is large enough for.
        let done = unsafe { libc::ioctl(tun.as_raw_fd(), libc::TUNSETIFF, request.as_mut_ptr()) };
        assert_eq!(
            done,
            0,
            "TUNSETIFF {name}: {}",
            std::io::Error::last_os_error()
        );
        tun
    })
}

/// Moves every packet read from `from` to `to`, until `from` goes (with its namespace). A
/// packet `to` refuses is lost, as on a wire.
fn carry(mut from: File, mut to: File) {
    thread::spawn(move || {
        let mut packet = vec![0u8; 65536];
        while let Ok(len @ 1..) = from.read(&mut packet) {
            let _ = to.write_all(&packet[..len]);
        }
    });
}

/// A client reaching the router's topology through a tunnel: `tun0` in its namespace,
/// `tun7` on the router, 10.30.1.0/24 and fd00:30::/64 between them.
fn tunnelled_client(topo: &Topo) -> Netns {
    let client = Netns::new("tunclient").unwrap();
    let client_tun = open_tun(&client, "tun0");
    let router_tun = open_tun(&topo.router, "tun7");
    for (netns, iface, addrs) in [
        (&client, "tun0", ["10.30.1.2/24", "fd00:30::2/64"]),
        (&topo.router, "tun7", ["10.30.1.1/24", "fd00:30::1/64"]),
    ] {
        for addr in addrs {
            netns
                .ip(&["addr", "add", addr, "dev", iface, "nodad"])
                .unwrap();
        }
        netns.ip(&["link", "set", iface, "up"]).unwrap();
    }
    carry(
        client_tun.try_clone().unwrap(),
        router_tun.try_clone().unwrap(),
    );
    carry(router_tun, client_tun);
    client
        .ip(&["route", "add", "default", "via", "10.30.1.1"])
        .unwrap();
    client
        .ip(&["-6", "route", "add", "default", "via", "fd00:30::1"])
        .unwrap();
    client
}

#[test]
fn connections_and_datagrams_through_a_tun_device_are_steered_and_relayed() {
    require_root();
    let topo = Topo::new().unwrap();
    let client = tunnelled_client(&topo);
    let servers: Vec<Server> = [false, true]
        .map(|v6| Server::tell_peer(&topo.server, Topo::server_addr(v6, 80)).unwrap())
        .into();
    let echo = UdpEcho::start(&topo.server, Topo::server_addr(false, 5300)).unwrap();
    for (server, client_ip) in servers.iter().zip(["10.30.1.2", "fd00:30::2"]) {
        assert_eq!(
            peer_seen_by(&client, server.addr).unwrap().to_string(),
            client_ip,
            "before tproxy runs, the tunnel carries the connection unrelayed"
        );
    }
    let mut tproxy = Tproxy::start(
        &topo.router,
        &["--iface", "tun7", "--tcp", "80", "--udp", "5300"],
    )
    .unwrap();
    for server in &servers {
        assert_eq!(
            peer_seen_by(&client, server.addr).unwrap(),
            Topo::router_as_seen_by_server(server.addr.is_ipv6()),
            "{}",
            server.addr
        );
    }
    let socket = udp_client(&client, echo.addr).unwrap();
    let (reply, from) = udp_exchange(&socket, echo.addr, b"through the tunnel").unwrap();
    assert_eq!(reply, b"through the tunnel");
    assert_eq!(from, echo.addr, "the client sees the address it sent to");
    assert_eq!(echo.peer_ips(), vec![Topo::router_as_seen_by_server(false)]);
    tproxy.stop().unwrap();
    assert_eq!(tproxy.final_counter("tcp", "steered_new").unwrap(), 2);
    assert_eq!(tproxy.final_counter("udp", "steered_new").unwrap(), 1);
}
