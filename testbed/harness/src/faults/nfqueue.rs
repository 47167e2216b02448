//! Packet delay without `sch_netem` (this machine's kernel lacks it): an iptables
//! `NFQUEUE` rule in the pod's namespace hands packets to a netlink queue; a harness
//! thread holds each one for the delay, then accepts it. Only packet metadata is
//! copied to user space (`NFQNL_COPY_META`); packets keep their order.
//!
//! The netlink socket is opened inside the pod's network namespace (queues are per
//! namespace), so queue numbers never clash between pods.

use std::collections::VecDeque;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::{Direction, FaultError};

pub(super) const QUEUE_INBOUND: u16 = 1;
pub(super) const QUEUE_OUTBOUND: u16 = 2;

const NETLINK_NETFILTER: libc::c_int = 12;
const NFNL_SUBSYS_QUEUE: u16 = 3;
const NFQNL_MSG_PACKET: u16 = 0;
const NFQNL_MSG_VERDICT: u16 = 1;
const NFQNL_MSG_CONFIG: u16 = 2;
const NFQA_CFG_CMD: u16 = 1;
const NFQA_CFG_PARAMS: u16 = 2;
const NFQNL_CFG_CMD_BIND: u8 = 1;
const NFQNL_COPY_META: u8 = 1;
const NFQA_PACKET_HDR: u16 = 1;
const NFQA_VERDICT_HDR: u16 = 2;
const NF_ACCEPT: u32 = 1;
const NLM_F_REQUEST: u16 = 1;
const NLM_F_ACK: u16 = 4;
const NLMSG_ERROR: u16 = 2;
const NLMSG_HDRLEN: usize = 16;
const NFGEN_HDRLEN: usize = 4;

/// A thread delaying the packets of one queue. Dropping it stops the thread and closes
/// the socket (remove the `NFQUEUE` rule first, or queued packets are dropped).
#[derive(Debug)]
pub(super) struct DelayWorker {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl DelayWorker {
    /// Binds queue `queue` in the namespace at `netns` and starts delaying its packets.
    pub(super) fn start(
        pod: &str,
        netns: &Path,
        direction: Direction,
        queue: u16,
        delay: Duration,
    ) -> Result<Self, FaultError> {
        let error = |step: &'static str| {
            let pod = pod.to_owned();
            move |source| FaultError::Queue {
                pod,
                direction,
                step,
                source,
            }
        };
        let ns = std::fs::File::open(netns).map_err(error("open the network namespace"))?;
        // Open the socket on a thread inside the namespace; the socket stays there.
        let socket = std::thread::spawn(move || -> io::Result<OwnedFd> {
            // SAFETY: setns on an fd we own, affecting only this short-lived thread.
            check(unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) })?;
            open_socket()
        })
        .join()
        .map_err(|_| io::Error::other("the thread panicked"))
        .and_then(|r| r)
        .map_err(error("open a netlink socket in the pod"))?;
        configure(&socket, queue).map_err(error("bind its netlink queue"))?;
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let pod_name = pod.to_owned();
        let thread = std::thread::Builder::new()
            .name(format!("pgrs-delay-{queue}"))
            .spawn(move || {
                if let Err(e) = delay_loop(&socket, queue, delay, &flag) {
                    tracing::warn!(pod = %pod_name, %direction, error = %e, "delay queue stopped");
                }
            })
            .map_err(error("start its thread"))?;
        Ok(Self {
            stop,
            thread: Some(thread),
        })
    }
}

impl Drop for DelayWorker {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

fn check(rc: libc::c_int) -> io::Result<()> {
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

fn open_socket() -> io::Result<OwnedFd> {
    // SAFETY: plain syscalls; the fd is owned by the OwnedFd right away.
    unsafe {
        let fd = libc::socket(
            libc::AF_NETLINK,
            libc::SOCK_RAW | libc::SOCK_CLOEXEC,
            NETLINK_NETFILTER,
        );
        check(fd)?;
        let socket = OwnedFd::from_raw_fd(fd);
        let mut address: libc::sockaddr_nl = std::mem::zeroed();
        address.nl_family = libc::AF_NETLINK as libc::sa_family_t;
        check(libc::bind(
            socket.as_raw_fd(),
            std::ptr::from_ref(&address).cast(),
            std::mem::size_of::<libc::sockaddr_nl>() as libc::socklen_t,
        ))?;
        Ok(socket)
    }
}

/// A netfilter netlink message: header, `nfgenmsg` for `queue`, attributes.
fn message(kind: u16, flags: u16, queue: u16, attributes: &[(u16, &[u8])]) -> Vec<u8> {
    let mut out = vec![0u8; NLMSG_HDRLEN];
    out.extend([libc::AF_UNSPEC as u8, 0]);
    out.extend(queue.to_be_bytes());
    for (kind, payload) in attributes {
        let len = 4 + payload.len();
        out.extend((len as u16).to_ne_bytes());
        out.extend(kind.to_ne_bytes());
        out.extend(*payload);
        out.resize(out.len().next_multiple_of(4), 0);
    }
    let len = out.len() as u32;
    out[0..4].copy_from_slice(&len.to_ne_bytes());
    out[4..6].copy_from_slice(&((NFNL_SUBSYS_QUEUE << 8) | kind).to_ne_bytes());
    out[6..8].copy_from_slice(&(NLM_F_REQUEST | flags).to_ne_bytes());
    out
}

fn send(socket: &OwnedFd, bytes: &[u8]) -> io::Result<()> {
    // SAFETY: sends from a live buffer.
    let sent = unsafe { libc::send(socket.as_raw_fd(), bytes.as_ptr().cast(), bytes.len(), 0) };
    if sent < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

fn recv(socket: &OwnedFd, buffer: &mut [u8], flags: libc::c_int) -> io::Result<usize> {
    // SAFETY: receives into a live buffer of the given length.
    let n = unsafe {
        libc::recv(
            socket.as_raw_fd(),
            buffer.as_mut_ptr().cast(),
            buffer.len(),
            flags,
        )
    };
    usize::try_from(n).map_err(|_| io::Error::last_os_error())
}

/// Sends a config message with an ack and checks the kernel's answer.
fn request(socket: &OwnedFd, bytes: &[u8]) -> io::Result<()> {
    send(socket, bytes)?;
    let mut buffer = vec![0u8; 8192];
    let n = recv(socket, &mut buffer, 0)?;
    for (kind, body) in messages(&buffer[..n]) {
        if kind == NLMSG_ERROR && body.len() >= 4 {
            let code = i32::from_ne_bytes([body[0], body[1], body[2], body[3]]);
            if code != 0 {
                return Err(io::Error::from_raw_os_error(-code));
            }
        }
    }
    Ok(())
}

fn configure(socket: &OwnedFd, queue: u16) -> io::Result<()> {
    let mut command = vec![NFQNL_CFG_CMD_BIND, 0];
    command.extend((libc::AF_INET as u16).to_be_bytes());
    request(
        socket,
        &message(
            NFQNL_MSG_CONFIG,
            NLM_F_ACK,
            queue,
            &[(NFQA_CFG_CMD, &command)],
        ),
    )?;
    let mut params = 0xffffu32.to_be_bytes().to_vec();
    params.push(NFQNL_COPY_META);
    request(
        socket,
        &message(
            NFQNL_MSG_CONFIG,
            NLM_F_ACK,
            queue,
            &[(NFQA_CFG_PARAMS, &params)],
        ),
    )
}

/// The netlink messages in `buffer`: (type, body after the netlink header).
fn messages(buffer: &[u8]) -> Vec<(u16, &[u8])> {
    let mut out = Vec::new();
    let mut at = 0;
    while at + NLMSG_HDRLEN <= buffer.len() {
        let len = u32::from_ne_bytes([buffer[at], buffer[at + 1], buffer[at + 2], buffer[at + 3]])
            as usize;
        if len < NLMSG_HDRLEN || at + len > buffer.len() {
            break;
        }
        let kind = u16::from_ne_bytes([buffer[at + 4], buffer[at + 5]]);
        out.push((kind, &buffer[at + NLMSG_HDRLEN..at + len]));
        at += len.next_multiple_of(4);
    }
    out
}

/// The packet id of a queued-packet message body.
fn packet_id(body: &[u8]) -> Option<u32> {
    let mut at = NFGEN_HDRLEN;
    while at + 4 <= body.len() {
        let len = u16::from_ne_bytes([body[at], body[at + 1]]) as usize;
        let kind = u16::from_ne_bytes([body[at + 2], body[at + 3]]) & 0x3fff;
        if len < 4 || at + len > body.len() {
            return None;
        }
        if kind == NFQA_PACKET_HDR && len >= 8 {
            let p = &body[at + 4..];
            return Some(u32::from_be_bytes([p[0], p[1], p[2], p[3]]));
        }
        at += len.next_multiple_of(4);
    }
    None
}

fn delay_loop(socket: &OwnedFd, queue: u16, delay: Duration, stop: &AtomicBool) -> io::Result<()> {
    let mut pending: VecDeque<(Instant, u32)> = VecDeque::new();
    let mut buffer = vec![0u8; 65536];
    while !stop.load(Ordering::SeqCst) {
        let now = Instant::now();
        while let Some(&(due, id)) = pending.front() {
            if due > now {
                break;
            }
            pending.pop_front();
            let mut verdict = NF_ACCEPT.to_be_bytes().to_vec();
            verdict.extend(id.to_be_bytes());
            send(
                socket,
                &message(NFQNL_MSG_VERDICT, 0, queue, &[(NFQA_VERDICT_HDR, &verdict)]),
            )?;
        }
        let wait = pending
            .front()
            .map_or(Duration::from_millis(50), |(due, _)| {
                due.saturating_duration_since(now)
            })
            .min(Duration::from_millis(50));
        let mut poll = libc::pollfd {
            fd: socket.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        let millis = wait.as_micros().div_ceil(1000) as libc::c_int;
        // SAFETY: polls one live pollfd.
        check(unsafe { libc::poll(&mut poll, 1, millis) })?;
        loop {
            match recv(socket, &mut buffer, libc::MSG_DONTWAIT) {
                Ok(n) => {
                    let arrived = Instant::now();
                    for (kind, body) in messages(&buffer[..n]) {
                        if kind == (NFNL_SUBSYS_QUEUE << 8) | NFQNL_MSG_PACKET
                            && let Some(id) = packet_id(body)
                        {
                            pending.push_back((arrived + delay, id));
                        }
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                // The queue overflowed: the kernel dropped packets, as a full link would.
                Err(e) if e.raw_os_error() == Some(libc::ENOBUFS) => continue,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            }
        }
    }
    Ok(())
}
