//! A client for the local-origin tests, run as its own process so that it can live in a test
//! cgroup: `dial tcp|udp ADDR:PORT MESSAGE` connects (a UDP socket too), sends MESSAGE, and
//! prints the peer its socket reports (getpeername) and the reply, on one line:
//! `PEER REPLY`. TCP half-closes after sending and reads to the end; UDP reads one datagram.

use std::{
    io::{Read, Write},
    net::{Shutdown, SocketAddr, TcpStream, UdpSocket},
    process::ExitCode,
    time::Duration,
};

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [proto, addr, message] = &args[..] else {
        eprintln!("usage: dial tcp|udp ADDR:PORT MESSAGE");
        return ExitCode::from(2);
    };
    let addr: SocketAddr = match addr.parse() {
        Ok(addr) => addr,
        Err(error) => {
            eprintln!("dial: `{addr}`: {error}");
            return ExitCode::from(2);
        }
    };
    let result = match proto.as_str() {
        "tcp" => tcp(addr, message),
        "udp" => udp(addr, message),
        other => Err(std::io::Error::other(format!(
            "`{other}` is not tcp or udp"
        ))),
    };
    match result {
        Ok((peer, reply)) => {
            println!("{peer} {reply}");
            ExitCode::SUCCESS
        }
        Err(error) => {
            eprintln!("dial {proto} {addr}: {error}");
            ExitCode::FAILURE
        }
    }
}

const PATIENCE: Duration = Duration::from_secs(10);

fn tcp(addr: SocketAddr, message: &str) -> std::io::Result<(SocketAddr, String)> {
    let mut stream = TcpStream::connect_timeout(&addr, PATIENCE)?;
    stream.set_read_timeout(Some(PATIENCE))?;
    let peer = stream.peer_addr()?;
    stream.write_all(message.as_bytes())?;
    stream.shutdown(Shutdown::Write)?;
    let mut reply = String::new();
    stream.read_to_string(&mut reply)?;
    Ok((peer, reply))
}

fn udp(addr: SocketAddr, message: &str) -> std::io::Result<(SocketAddr, String)> {
    let any: SocketAddr = match addr {
        SocketAddr::V4(_) => "0.0.0.0:0".parse().unwrap(),
        SocketAddr::V6(_) => "[::]:0".parse().unwrap(),
    };
    let socket = UdpSocket::bind(any)?;
    socket.connect(addr)?;
    socket.set_read_timeout(Some(PATIENCE))?;
    let peer = socket.peer_addr()?;
    socket.send(message.as_bytes())?;
    let mut buf = [0u8; 2048];
    let len = socket.recv(&mut buf)?;
    Ok((peer, String::from_utf8_lossy(&buf[..len]).into_owned()))
}
