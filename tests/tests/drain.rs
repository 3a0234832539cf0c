//! Stopping is graceful by default: without `--drain-timeout`, SIGTERM lets a transfer in
//! flight finish before tproxy exits, and a second SIGTERM cuts the drain short.

use std::{
    io::{Read, Write},
    thread,
    time::Duration,
};

use nix::sys::signal::Signal;
use tproxy_tests::{
    digest, digest_to_eof, payload, require_root, RouterTopology as Topo, Server, Tproxy,
};

const CHUNK: usize = 32 * 1024;
const CHUNK_GAP: Duration = Duration::from_millis(100);

/// A server that streams `chunks` chunks slowly (one every [`CHUNK_GAP`]) once asked, then
/// closes.
fn slow_server(topo: &Topo, chunks: usize) -> Server {
    Server::start(
        &topo.server,
        Topo::server_addr(false, 80),
        move |mut stream| {
            let mut ask = [0u8; 1];
            if stream.read_exact(&mut ask).is_err() {
                return;
            }
            for chunk in payload(chunks * CHUNK, 7).chunks(CHUNK) {
                if stream.write_all(chunk).is_err() {
                    return;
                }
                thread::sleep(CHUNK_GAP);
            }
        },
    )
    .unwrap()
}

/// Starts the transfer from the client; the thread returns whether every byte arrived intact.
/// The request is written before the thread starts: written from the thread, it could come after
/// a stop the test had already signalled and fail for another reason than the one tested.
fn transfer(topo: &Topo, chunks: usize) -> thread::JoinHandle<Result<(), String>> {
    let mut stream = topo.client.connect(Topo::server_addr(false, 80)).unwrap();
    stream.write_all(b"L").unwrap();
    thread::spawn(move || {
        let got = digest_to_eof(&mut stream).map_err(|e| format!("transfer broke: {e}"))?;
        let want = digest(&payload(chunks * CHUNK, 7));
        if got != want {
            return Err(format!("got {got:?}, want {want:?}"));
        }
        Ok(())
    })
}

/// tproxy as an operator starts it: no `--drain-timeout`.
fn tproxy_with_default_drain(topo: &Topo) -> Tproxy {
    Tproxy::start_with_defaults(
        &topo.router,
        &["--iface", Topo::ROUTER_CLIENT_IFACE, "--tcp", "80"],
    )
    .unwrap()
}

fn sigterm(tproxy: &Tproxy) {
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(tproxy.pid() as i32),
        Signal::SIGTERM,
    )
    .unwrap();
}

#[test]
fn by_default_sigterm_lets_a_transfer_in_flight_finish() {
    require_root();
    let topo = Topo::new().unwrap();
    // About 3 s of transfer, well inside the default drain.
    const CHUNKS: usize = 30;
    let _server = slow_server(&topo, CHUNKS);
    let mut tproxy = tproxy_with_default_drain(&topo);
    let transfer = transfer(&topo, CHUNKS);
    tproxy
        .wait_for_line("relaying via", Duration::from_secs(5))
        .unwrap();
    sigterm(&tproxy);
    tproxy
        .wait_for_line("stopping: draining for up to 30s", Duration::from_secs(5))
        .unwrap();
    assert_eq!(transfer.join().unwrap(), Ok(()), "{}", tproxy.log_text());
    let status = tproxy.wait(Duration::from_secs(20)).unwrap();
    assert!(status.success(), "{status}\n{}", tproxy.log_text());
}

#[test]
fn a_second_sigterm_cuts_the_default_drain_short() {
    require_root();
    let topo = Topo::new().unwrap();
    // About 20 s of transfer: it cannot end by itself before the second signal.
    const CHUNKS: usize = 200;
    let _server = slow_server(&topo, CHUNKS);
    let mut tproxy = tproxy_with_default_drain(&topo);
    let transfer = transfer(&topo, CHUNKS);
    tproxy
        .wait_for_line("relaying via", Duration::from_secs(5))
        .unwrap();
    sigterm(&tproxy);
    tproxy
        .wait_for_line("stopping: draining", Duration::from_secs(5))
        .unwrap();
    sigterm(&tproxy);
    let status = tproxy.wait(Duration::from_secs(10)).unwrap();
    assert!(status.success(), "{status}\n{}", tproxy.log_text());
    let cut = transfer.join().unwrap();
    assert!(
        cut.as_ref().is_err_and(|e| e.contains("transfer broke")),
        "{cut:?}"
    );
}

/// A UDP session that has gone quiet does not hold a stop for the whole drain: it lives until
/// its idle timeout (a minute), and a DNS router's every stop would otherwise take 30 s.
#[test]
fn a_quiet_udp_session_does_not_hold_the_stop() {
    require_root();
    let topo = Topo::new().unwrap();
    let server =
        tproxy_tests::UdpEcho::start(&topo.server, Topo::server_addr(false, 5300)).unwrap();
    let mut tproxy = Tproxy::start_with_defaults(
        &topo.router,
        &["--iface", Topo::ROUTER_CLIENT_IFACE, "--udp", "5300"],
    )
    .unwrap();
    let client = tproxy_tests::udp_client(&topo.client, server.addr).unwrap();
    let (reply, _) = tproxy_tests::udp_exchange(&client, server.addr, b"query").unwrap();
    assert_eq!(reply, b"query");
    assert_eq!(tproxy.udp_stat("active").unwrap(), 1, "the session is open");
    thread::sleep(Duration::from_secs(3));
    sigterm(&tproxy);
    // Well inside the 30 s drain, and the session's 60 s idle timeout.
    let status = tproxy.wait(Duration::from_secs(15)).unwrap();
    assert!(status.success(), "{status:?}\n{}", tproxy.log_text());
}
