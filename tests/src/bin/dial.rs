//! A client for the local-origin tests, run as its own process so that it can live in a test
//! cgroup: `dial tcp|udp ADDR:PORT MESSAGE [ADDR:PORT…]` connects (a UDP socket too), sends
//! MESSAGE, and prints the peer its socket reports (getpeername) and the reply, on one line:
//! `PEER REPLY`. TCP half-closes after sending and reads to the end; UDP reads one datagram,
//! then disconnects the same socket and connects it to each further address in turn.
//! `dial sendto ADDR:PORT MESSAGE [ADDR:PORT…]` sends from one unconnected UDP socket to each
//! address in turn and prints each reply's sender and the reply; `dial sendto-from BIND
//! MESSAGE ADDR:PORT…` does the same from a socket bound to BIND. With `DIAL_MARK=N` in the
//! environment, the socket (TCP or UDP) gets `SO_MARK` N before it connects or sends, as a
//! proxy marks its upstream connections; with `DIAL_DEVICE=NAME`, it is bound to that
//! interface, and `dial tcp` adds the socket's `SO_MARK` after the exchange to its line
//! (`PEER REPLY mark=N`). With `DIAL_UID=N`, `dial udp` becomes user N (all three user ids)
//! after its first exchange, keeping the socket: a process that leaves a selection by user.
//! With `DIAL_SPORT=N`, `dial tcp` binds its socket to port N before it connects, as a
//! server's own connections from its port do. `dial answer BIND MESSAGE ADDR:PORT` is a UDP
//! server instead: its unconnected socket, bound to BIND, waits for one datagram from ADDR
//! (the address alone: any port), answers it with MESSAGE (`sendto` its sender), and prints
//! the sender and what it sent.

use std::{
    io::{Read, Write},
    net::{Shutdown, SocketAddr, TcpStream, UdpSocket},
    os::fd::AsRawFd,
    process::ExitCode,
    time::Duration,
};

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [proto, first, message, more @ ..] = &args[..] else {
        eprintln!("usage: dial tcp|udp|sendto ADDR:PORT MESSAGE [ADDR:PORT…], dial sendto-from BIND MESSAGE ADDR:PORT…, dial answer BIND MESSAGE ADDR:PORT");
        return ExitCode::from(2);
    };
    let mut addrs = Vec::new();
    for text in std::iter::once(first).chain(more) {
        match text.parse::<SocketAddr>() {
            Ok(addr) => addrs.push(addr),
            Err(error) => {
                eprintln!("dial: `{text}`: {error}");
                return ExitCode::from(2);
            }
        }
    }
    let result = match proto.as_str() {
        "tcp" => tcp(addrs[0], message).map(|line| vec![line]),
        "udp" => udp(&addrs, message),
        "sendto" => unbound_udp(addrs[0]).and_then(|socket| sendto(&socket, &addrs, message)),
        "answer" => bound_udp(addrs[0]).and_then(|socket| answer(&socket, addrs[1], message)),
        "sendto-from" => {
            bound_udp(addrs[0]).and_then(|socket| sendto(&socket, &addrs[1..], message))
        }
        other => Err(std::io::Error::other(format!(
            "`{other}` is not tcp, udp, sendto, sendto-from or answer"
        ))),
    };
    match result {
        Ok(lines) => {
            for (peer, reply) in lines {
                println!("{peer} {reply}");
            }
            ExitCode::SUCCESS
        }
        Err(error) => {
            eprintln!("dial {proto} {first}: {error}");
            ExitCode::FAILURE
        }
    }
}

const PATIENCE: Duration = Duration::from_secs(10);

fn tcp(addr: SocketAddr, message: &str) -> std::io::Result<(SocketAddr, String)> {
    let socket = socket2::Socket::new(
        socket2::Domain::for_address(addr),
        socket2::Type::STREAM,
        None,
    )?;
    options_of_environment(&socket)?;
    if let Ok(port) = std::env::var("DIAL_SPORT") {
        let port = port.parse().map_err(std::io::Error::other)?;
        let any: std::net::IpAddr = match addr {
            SocketAddr::V4(_) => std::net::Ipv4Addr::UNSPECIFIED.into(),
            SocketAddr::V6(_) => std::net::Ipv6Addr::UNSPECIFIED.into(),
        };
        socket.bind(&SocketAddr::new(any, port).into())?;
    }
    socket.connect_timeout(&addr.into(), PATIENCE)?;
    let mut stream = TcpStream::from(socket);
    stream.set_read_timeout(Some(PATIENCE))?;
    let peer = stream.peer_addr()?;
    stream.write_all(message.as_bytes())?;
    stream.shutdown(Shutdown::Write)?;
    let mut reply = String::new();
    stream.read_to_string(&mut reply)?;
    if std::env::var_os("DIAL_DEVICE").is_some() {
        let socket = socket2::SockRef::from(&stream);
        reply = format!("{reply} mark={}", socket.mark()?);
    }
    Ok((peer, reply))
}

fn unbound_udp(like: SocketAddr) -> std::io::Result<UdpSocket> {
    let any: SocketAddr = match like {
        SocketAddr::V4(_) => "0.0.0.0:0".parse().unwrap(),
        SocketAddr::V6(_) => "[::]:0".parse().unwrap(),
    };
    bound_udp(any)
}

/// Waits for a datagram from `from`'s address, and answers its sender with `message`.
fn answer(
    socket: &UdpSocket,
    from: SocketAddr,
    message: &str,
) -> std::io::Result<Vec<(SocketAddr, String)>> {
    socket.set_read_timeout(Some(PATIENCE * 3))?;
    let mut buf = [0u8; 1500];
    loop {
        let (len, sender) = socket.recv_from(&mut buf)?;
        // A dual-stack socket reports an IPv4 sender as mapped (::ffff:a.b.c.d).
        if sender.ip().to_canonical() == from.ip() {
            socket.send_to(message.as_bytes(), sender)?;
            let got = String::from_utf8_lossy(&buf[..len]).trim_end().to_string();
            return Ok(vec![(sender, got)]);
        }
    }
}

fn bound_udp(addr: SocketAddr) -> std::io::Result<UdpSocket> {
    let socket = UdpSocket::bind(addr)?;
    options_of_environment(&socket2::SockRef::from(&socket))?;
    socket.set_read_timeout(Some(PATIENCE))?;
    Ok(socket)
}

/// `DIAL_DEVICE`, if set: the interface the socket is bound to (`SO_BINDTODEVICE`);
/// `DIAL_MARK`, if set: the socket's `SO_MARK`.
fn options_of_environment(socket: &socket2::Socket) -> std::io::Result<()> {
    if let Ok(device) = std::env::var("DIAL_DEVICE") {
        socket.bind_device(Some(device.as_bytes()))?;
    }
    let Ok(mark) = std::env::var("DIAL_MARK") else {
        return Ok(());
    };
    let mark = mark
        .parse()
        .map_err(|_| std::io::Error::other(format!("DIAL_MARK `{mark}` is not a number")))?;
    socket.set_mark(mark)
}

fn udp(addrs: &[SocketAddr], message: &str) -> std::io::Result<Vec<(SocketAddr, String)>> {
    let socket = unbound_udp(addrs[0])?;
    let mut lines = Vec::new();
    for (i, addr) in addrs.iter().enumerate() {
        if i > 0 {
            disconnect(&socket)?;
        }
        if i == 1 {
            become_user_of_environment()?;
        }
        socket.connect(addr)?;
        let peer = socket.peer_addr()?;
        socket.send(message.as_bytes())?;
        let mut buf = [0u8; 2048];
        let len = socket.recv(&mut buf)?;
        lines.push((peer, String::from_utf8_lossy(&buf[..len]).into_owned()));
    }
    Ok(lines)
}

/// `DIAL_UID`, if set: the process becomes that user.
fn become_user_of_environment() -> std::io::Result<()> {
    let Ok(uid) = std::env::var("DIAL_UID") else {
        return Ok(());
    };
    let uid: libc::uid_t = uid
        .parse()
        .map_err(|_| std::io::Error::other(format!("DIAL_UID `{uid}` is not a number")))?;
    // SAFETY: a plain system call on the calling process.
    if unsafe { libc::setresuid(uid, uid, uid) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// `connect(AF_UNSPEC)`: the socket forgets its peer, and its local address unless bound.
/// Connecting it elsewhere without this keeps the local address it had (127.0.0.1 for a
/// steered socket), which cannot reach a remote destination directly (EINVAL).
fn disconnect(socket: &UdpSocket) -> std::io::Result<()> {
    // SAFETY: a zeroed sockaddr with only its family set, of the length given.
    let ret = unsafe {
        let mut unspec: libc::sockaddr = std::mem::zeroed();
        unspec.sa_family = libc::AF_UNSPEC as libc::sa_family_t;
        libc::connect(
            socket.as_raw_fd(),
            &unspec,
            std::mem::size_of::<libc::sockaddr>() as libc::socklen_t,
        )
    };
    if ret != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

fn sendto(
    socket: &UdpSocket,
    addrs: &[SocketAddr],
    message: &str,
) -> std::io::Result<Vec<(SocketAddr, String)>> {
    let mut lines = Vec::new();
    for addr in addrs {
        socket.send_to(message.as_bytes(), addr)?;
        let mut buf = [0u8; 2048];
        let (len, from) = socket.recv_from(&mut buf)?;
        lines.push((from, String::from_utf8_lossy(&buf[..len]).into_owned()));
    }
    Ok(lines)
}
