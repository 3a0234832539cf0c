//! Batched datagram I/O: one recvmmsg(2) or sendmmsg(2) per burst instead of one system call
//! per datagram. The buffers are per thread and only used between two awaits, so a session
//! holds no buffer of its own, however many sessions there are.

use std::{
    cell::RefCell,
    io::{self, IoSlice, IoSliceMut},
    net::{Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6},
    os::fd::{AsRawFd, BorrowedFd},
};

use nix::{
    cmsg_space,
    sys::socket::{
        recvmmsg, sendmmsg, ControlMessageOwned, MsgFlags, MultiHeaders, SockaddrStorage,
    },
};

/// Datagrams per system call.
pub(super) const BATCH: usize = 32;
/// Largest UDP payload (IPv4 limit; IPv6 jumbograms are not relayed).
const MAX_DATAGRAM: usize = 65535;

thread_local! {
    static BUFFERS: RefCell<Vec<Vec<u8>>> = RefCell::new(vec![vec![0; MAX_DATAGRAM]; BATCH]);
}

/// Receives up to [`BATCH`] datagrams from a connected (or listening) socket and hands their
/// payloads to `then`. `WouldBlock` when none was waiting.
pub(super) fn recv<R>(from: BorrowedFd<'_>, then: impl FnOnce(&[&[u8]]) -> R) -> io::Result<R> {
    BUFFERS.with_borrow_mut(|buffers| {
        let lengths = {
            let mut slices: Vec<[IoSliceMut<'_>; 1]> =
                buffers.iter_mut().map(|b| [IoSliceMut::new(b)]).collect();
            let mut headers = MultiHeaders::<()>::preallocate(BATCH, None);
            recvmmsg(
                from.as_raw_fd(),
                &mut headers,
                slices.iter_mut(),
                MsgFlags::MSG_DONTWAIT,
                None,
            )?
            .map(|message| message.bytes)
            .collect::<Vec<_>>()
        };
        let payloads: Vec<&[u8]> = buffers.iter().zip(lengths).map(|(b, n)| &b[..n]).collect();
        Ok(then(&payloads))
    })
}

/// Receives up to [`BATCH`] datagrams from a transparent listener and hands each to `each`
/// with its sender and its original destination (from IP_ORIGDSTADDR / IPV6_ORIGDSTADDR).
/// Datagrams without that control message were not steered to us and are skipped. Returns
/// the listener's count of datagrams dropped for want of receive buffer since it was
/// created (SO_RXQ_OVFL, if enabled), as of the last datagram received.
pub(super) fn recv_steered(
    listener: BorrowedFd<'_>,
    mut each: impl FnMut(SocketAddr, SocketAddr, &[u8]),
) -> io::Result<Option<u32>> {
    BUFFERS.with_borrow_mut(|buffers| {
        let mut overflows = None;
        let received: Vec<(usize, Option<SocketAddr>, Option<SocketAddr>)> = {
            let mut slices: Vec<[IoSliceMut<'_>; 1]> =
                buffers.iter_mut().map(|b| [IoSliceMut::new(b)]).collect();
            let space = cmsg_space!(libc::sockaddr_in6, u32);
            let mut headers = MultiHeaders::<SockaddrStorage>::preallocate(BATCH, Some(space));
            let results = recvmmsg(
                listener.as_raw_fd(),
                &mut headers,
                slices.iter_mut(),
                MsgFlags::MSG_DONTWAIT,
                None,
            )?;
            results
                .map(|message| {
                    let client = message.address.as_ref().and_then(socket_addr);
                    let original = message.cmsgs().ok().and_then(|cmsgs| {
                        cmsgs.fold(None, |original, cmsg| match cmsg {
                            ControlMessageOwned::Ipv4OrigDstAddr(sin) => {
                                Some(SocketAddr::V4(SocketAddrV4::new(
                                    Ipv4Addr::from(u32::from_be(sin.sin_addr.s_addr)),
                                    u16::from_be(sin.sin_port),
                                )))
                            }
                            ControlMessageOwned::RxqOvfl(dropped) => {
                                overflows = Some(dropped);
                                original
                            }
                            ControlMessageOwned::Ipv6OrigDstAddr(sin6) => {
                                Some(SocketAddr::V6(SocketAddrV6::new(
                                    Ipv6Addr::from(sin6.sin6_addr.s6_addr),
                                    u16::from_be(sin6.sin6_port),
                                    0,
                                    0,
                                )))
                            }
                            _ => original,
                        })
                    });
                    (message.bytes, client, original)
                })
                .collect()
        };
        for (buffer, (len, client, original)) in buffers.iter().zip(received) {
            if let (Some(client), Some(original)) = (client, original) {
                each(client, original, &buffer[..len]);
            }
        }
        Ok(overflows)
    })
}

fn socket_addr(storage: &SockaddrStorage) -> Option<SocketAddr> {
    if let Some(v4) = storage.as_sockaddr_in() {
        return Some(SocketAddr::V4((*v4).into()));
    }
    storage
        .as_sockaddr_in6()
        .map(|v6| SocketAddr::V6((*v6).into()))
}

/// Sends `datagrams` on a connected socket in as few calls as possible; returns how many
/// went out. A full send buffer ends the attempt: the rest are dropped, as a router would.
pub(super) fn send(to: BorrowedFd<'_>, datagrams: &[&[u8]]) -> io::Result<usize> {
    let mut sent = 0;
    for chunk in datagrams.chunks(BATCH) {
        let slices: Vec<[IoSlice<'_>; 1]> = chunk.iter().map(|d| [IoSlice::new(d)]).collect();
        let addrs: Vec<Option<()>> = vec![None; chunk.len()];
        let mut headers = MultiHeaders::<()>::preallocate(chunk.len(), None);
        match sendmmsg(
            to.as_raw_fd(),
            &mut headers,
            slices.iter(),
            addrs,
            [],
            MsgFlags::MSG_DONTWAIT,
        ) {
            Ok(results) => {
                let count = results.count();
                sent += count;
                if count < chunk.len() {
                    break;
                }
            }
            Err(nix::errno::Errno::EAGAIN) if sent > 0 => break,
            Err(errno) => return Err(errno.into()),
        }
    }
    Ok(sent)
}
