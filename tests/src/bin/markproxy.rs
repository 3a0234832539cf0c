//! A transparent proxy for the local-origin tests, run as its own process so that it can live
//! in a test cgroup: `markproxy LISTEN MARK` listens transparently at LISTEN, accepts one
//! connection, connects to the address the connection was accepted on (its original
//! destination) from a socket with `SO_MARK` MARK, as proxies mark their upstream sockets,
//! relays the client's request (to its half-close) and the reply, and exits. It prints
//! `upstream PEER` once connected. A connection that loops back to its own listener gets no
//! reply, and no connection may come at all: the proxy gives up after a few seconds and
//! exits with an error.

use std::{
    io::{Read, Write},
    net::{Shutdown, SocketAddr, TcpStream},
    process::ExitCode,
    time::Duration,
};

const PATIENCE: Duration = Duration::from_secs(5);

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [listen, mark] = &args[..] else {
        eprintln!("usage: markproxy LISTEN_ADDR:PORT MARK");
        return ExitCode::from(2);
    };
    let (Ok(listen), Ok(mark)) = (listen.parse::<SocketAddr>(), mark.parse::<u32>()) else {
        eprintln!("markproxy: `{listen}` or `{mark}` is not an address or a mark");
        return ExitCode::from(2);
    };
    match proxy_one(listen, mark) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("markproxy: {error}");
            ExitCode::FAILURE
        }
    }
}

fn proxy_one(listen: SocketAddr, mark: u32) -> std::io::Result<()> {
    let domain = socket2::Domain::for_address(listen);
    let listener = socket2::Socket::new(domain, socket2::Type::STREAM, None)?;
    match listen {
        SocketAddr::V4(_) => listener.set_ip_transparent_v4(true)?,
        SocketAddr::V6(_) => listener.set_ip_transparent_v6(true)?,
    }
    listener.set_reuse_address(true)?;
    listener.bind(&listen.into())?;
    listener.listen(4)?;
    // No connection at all: the test's app went elsewhere.
    listener.set_read_timeout(Some(PATIENCE))?;
    // Ready: the test waits for this line before it dials.
    println!("listening");
    std::io::stdout().flush()?;
    let (client, _) = listener.accept()?;
    let mut client = TcpStream::from(client);
    client.set_read_timeout(Some(PATIENCE))?;
    let original = client.local_addr()?;
    let upstream = socket2::Socket::new(
        socket2::Domain::for_address(original),
        socket2::Type::STREAM,
        None,
    )?;
    upstream.set_mark(mark)?;
    upstream.connect_timeout(&original.into(), PATIENCE)?;
    let mut upstream = TcpStream::from(upstream);
    upstream.set_read_timeout(Some(PATIENCE))?;
    println!("upstream {original}");
    let mut request = Vec::new();
    client.read_to_end(&mut request)?;
    upstream.write_all(&request)?;
    upstream.shutdown(Shutdown::Write)?;
    let mut reply = Vec::new();
    upstream.read_to_end(&mut reply)?;
    client.write_all(&reply)?;
    Ok(())
}
