//! The vhost-user message relay that adds the device IOTLB to rust-vmm's handler.
//!
//! vhost 0.18's request handler rejects `VHOST_USER_IOTLB_MSG` (and would
//! drop the connection) and treats ring addresses as the frontend's virtual
//! addresses, which under VIRTIO_F_ACCESS_PLATFORM they are not: they are
//! IOVAs. So with `--iommu-platform on` the daemon's handler does not talk to
//! the frontend directly: this relay sits between them on a private socket
//! pair and forwards every message (with its file descriptors) both ways,
//! except that it
//! - answers `IOTLB_MSG` itself (update / invalidate the [`VhostIotlb`], and
//!   the reply-ack the frontend asked for);
//! - reads SET_FEATURES, SET_MEM_TABLE, ADD_MEM_REG and REM_MEM_REG on their
//!   way (acknowledged features; frontend address → guest-physical map);
//! - keeps a duplicate of the backend channel (SET_BACKEND_REQ_FD) for misses;
//! - with ACCESS_PLATFORM negotiated, records SET_VRING_ADDR's ring IOVAs for
//!   the device and hands the handler a harmless valid address instead.
//!
//! Framing: a 12-byte header (request, flags, size) and `size` bytes of
//! payload, at most 4 KiB as the protocol allows; anything else ends the
//! connection, never the daemon.

use std::io::{self, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::DirBuilderExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use vhost::vhost_user::Listener;
use vhost_user_backend::VhostUserDaemon;

use crate::device::BlkDevice;
use crate::iotlb::{IotlbMsg, MemRegion, RingIovas, VhostIotlb};
use crate::Error;

/// Largest payload the protocol allows (vhost's MAX_MSG_SIZE).
const MAX_PAYLOAD: usize = 0x1000;
/// Most file descriptors one message carries.
const MAX_FDS: usize = 32;
const HDR_LEN: usize = 12;

/// Frontend request codes the relay looks at.
const SET_FEATURES: u32 = 2;
const SET_MEM_TABLE: u32 = 5;
const SET_VRING_ADDR: u32 = 9;
const SET_BACKEND_REQ_FD: u32 = 21;
const IOTLB_MSG: u32 = 22;
const ADD_MEM_REG: u32 = 37;
const REM_MEM_REG: u32 = 38;

/// Header flags.
const FLAG_VERSION: u32 = 0x1;
const FLAG_REPLY: u32 = 0x4;
const FLAG_NEED_REPLY: u32 = 0x8;

/// Bytes of a memory region description (gpa, size, uaddr, mmap offset).
const REGION_LEN: usize = 32;

/// One vhost-user message with the descriptors that came with it.
struct Msg {
    hdr: [u8; HDR_LEN],
    payload: Vec<u8>,
    fds: Vec<OwnedFd>,
}

impl Msg {
    fn word(&self, i: usize) -> u32 {
        let mut b = [0u8; 4];
        b.copy_from_slice(&self.hdr[i * 4..i * 4 + 4]);
        u32::from_le_bytes(b)
    }
    fn request(&self) -> u32 {
        self.word(0)
    }
    fn flags(&self) -> u32 {
        self.word(1)
    }
}

fn le64(b: &[u8], at: usize) -> Option<u64> {
    let s = b.get(at..at.checked_add(8)?)?;
    let mut a = [0u8; 8];
    a.copy_from_slice(s);
    Some(u64::from_le_bytes(a))
}

/// `recvmsg` into `buf`, collecting SCM_RIGHTS descriptors into `fds`.
fn recv_with_fds(sock: &UnixStream, buf: &mut [u8], fds: &mut Vec<OwnedFd>) -> io::Result<usize> {
    // A message may arrive in many short reads, each with its own batch of
    // descriptors: the cap is on the message, checked as they come, so a
    // frontend cannot pile up descriptors until the daemon runs out.
    if fds.len() > MAX_FDS {
        return Err(io::Error::other(format!(
            "more than {MAX_FDS} file descriptors in one message"
        )));
    }
    let mut cmsg = [0u64; (MAX_FDS * 4 + 64) / 8];
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    // SAFETY: msghdr is plain data; every pointer in it refers to a live local buffer.
    let mut mh: libc::msghdr = unsafe { std::mem::zeroed() };
    mh.msg_iov = &mut iov;
    mh.msg_iovlen = 1;
    mh.msg_control = cmsg.as_mut_ptr().cast();
    mh.msg_controllen = std::mem::size_of_val(&cmsg) as _;
    // SAFETY: `mh` describes valid buffers for the duration of the call.
    let n = unsafe { libc::recvmsg(sock.as_raw_fd(), &mut mh, libc::MSG_CMSG_CLOEXEC) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: walking the control buffer the kernel just filled, with the libc macros.
    unsafe {
        let mut c = libc::CMSG_FIRSTHDR(&mh);
        while !c.is_null() {
            if (*c).cmsg_level == libc::SOL_SOCKET && (*c).cmsg_type == libc::SCM_RIGHTS {
                let data = libc::CMSG_DATA(c).cast::<RawFd>();
                let len = (*c).cmsg_len as usize - libc::CMSG_LEN(0) as usize;
                for i in 0..len / std::mem::size_of::<RawFd>() {
                    let fd = std::ptr::read_unaligned(data.add(i));
                    fds.push(OwnedFd::from_raw_fd(fd));
                }
            }
            c = libc::CMSG_NXTHDR(&mh, c);
        }
    }
    if mh.msg_flags & libc::MSG_CTRUNC != 0 {
        return Err(io::Error::other("too many file descriptors in one message"));
    }
    Ok(n as usize)
}

/// Read one message; `Ok(None)` on a clean end of stream.
fn recv_msg(sock: &UnixStream) -> io::Result<Option<Msg>> {
    let mut hdr = [0u8; HDR_LEN];
    let mut fds = Vec::new();
    let mut got = 0;
    while got < HDR_LEN {
        let n = recv_with_fds(sock, &mut hdr[got..], &mut fds)?;
        if n == 0 {
            if got == 0 {
                return Ok(None);
            }
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        got += n;
    }
    let msg = Msg {
        hdr,
        payload: Vec::new(),
        fds,
    };
    let size = msg.word(2) as usize;
    if size > MAX_PAYLOAD {
        return Err(io::Error::other(format!(
            "message {} with a {size}-byte payload",
            msg.request()
        )));
    }
    let mut msg = msg;
    msg.payload = vec![0u8; size];
    let mut got = 0;
    while got < size {
        let n = recv_with_fds(sock, &mut msg.payload[got..], &mut msg.fds)?;
        if n == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        got += n;
    }
    Ok(Some(msg))
}

/// Write one message, its descriptors attached to the first byte.
fn send_msg(sock: &UnixStream, hdr: &[u8], payload: &[u8], fds: &[OwnedFd]) -> io::Result<()> {
    let mut data = Vec::with_capacity(hdr.len() + payload.len());
    data.extend_from_slice(hdr);
    data.extend_from_slice(payload);
    let mut cmsg = [0u64; (MAX_FDS * 4 + 64) / 8];
    let mut iov = libc::iovec {
        iov_base: data.as_mut_ptr().cast(),
        iov_len: data.len(),
    };
    // SAFETY: plain data; pointers refer to live local buffers.
    let mut mh: libc::msghdr = unsafe { std::mem::zeroed() };
    mh.msg_iov = &mut iov;
    mh.msg_iovlen = 1;
    if !fds.is_empty() {
        let bytes = std::mem::size_of::<RawFd>() * fds.len();
        // SAFETY: CMSG_SPACE/CMSG_LEN are pure computations.
        let space = unsafe { libc::CMSG_SPACE(bytes as u32) } as usize;
        if space > std::mem::size_of_val(&cmsg) {
            return Err(io::Error::other("too many file descriptors"));
        }
        mh.msg_control = cmsg.as_mut_ptr().cast();
        mh.msg_controllen = space as _;
        // SAFETY: the control buffer holds `space` bytes, enough for one SCM_RIGHTS header and the fds.
        unsafe {
            let c = libc::CMSG_FIRSTHDR(&mh);
            (*c).cmsg_level = libc::SOL_SOCKET;
            (*c).cmsg_type = libc::SCM_RIGHTS;
            (*c).cmsg_len = libc::CMSG_LEN(bytes as u32) as _;
            let p = libc::CMSG_DATA(c).cast::<RawFd>();
            for (i, fd) in fds.iter().enumerate() {
                std::ptr::write_unaligned(p.add(i), fd.as_raw_fd());
            }
        }
    }
    // SAFETY: `mh` describes valid buffers for the duration of the call.
    let n = unsafe { libc::sendmsg(sock.as_raw_fd(), &mh, libc::MSG_NOSIGNAL) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    let n = n as usize;
    if n < data.len() {
        let mut s = sock;
        s.write_all(&data[n..])?;
    }
    Ok(())
}

/// Parse `n` region descriptions starting at `at`.
fn regions(payload: &[u8], at: usize, n: usize) -> Option<Vec<MemRegion>> {
    (0..n)
        .map(|i| {
            let base = at.checked_add(i.checked_mul(REGION_LEN)?)?;
            Some(MemRegion {
                gpa: le64(payload, base)?,
                size: le64(payload, base + 8)?,
                uaddr: le64(payload, base + 16)?,
            })
        })
        .collect()
}

/// A running relay: its two threads end when either side closes.
pub struct Relay {
    threads: Vec<JoinHandle<()>>,
    frontend: UnixStream,
    daemon: UnixStream,
    iotlb: Arc<VhostIotlb>,
}

impl Relay {
    /// Close both sides, wait for the threads and log what the IOTLB did.
    pub fn finish(mut self) {
        let _ = self.frontend.shutdown(std::net::Shutdown::Both);
        let _ = self.daemon.shutdown(std::net::Shutdown::Both);
        self.iotlb.close();
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
        let c = self.iotlb.counters();
        log::info!(
            "IOTLB: {} misses, {} updates, {} invalidations, {} DMAs refused",
            c.misses,
            c.updates,
            c.invalidations,
            c.refused
        );
    }
}

/// Accept the next frontend on `listener` and start `daemon` behind a relay
/// that adds the device IOTLB `iotlb` (instead of `daemon.start(listener)`).
pub fn start_relayed(
    daemon: &mut VhostUserDaemon<BlkDevice>,
    listener: &mut Listener,
    iotlb: Arc<VhostIotlb>,
) -> Result<Relay, Error> {
    let frontend = loop {
        match listener.accept() {
            Ok(Some(s)) => break s,
            Ok(None) => continue,
            Err(e) => return Err(Error::Daemon(format!("accept: {e}"))),
        }
    };
    relay(frontend, iotlb, |l| {
        daemon
            .start(&mut Listener::from(l))
            .map_err(|e| io::Error::other(e.to_string()))
    })
    .map_err(Error::Setup)
}

/// A private socket path (in a fresh 0700 directory) for the handler's side.
fn private_socket() -> io::Result<(PathBuf, PathBuf)> {
    static N: AtomicU64 = AtomicU64::new(0);
    let dir = std::env::temp_dir().join(format!(
        "iovirt-vublk-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ));
    std::fs::DirBuilder::new().mode(0o700).create(&dir)?;
    Ok((dir.join("s"), dir))
}

/// Put the relay between `frontend` (an accepted connection) and the daemon:
/// `start` is given a listener on a private socket and must accept the
/// relay's connection on it (`VhostUserDaemon::start`).
pub fn relay<F>(frontend: UnixStream, iotlb: Arc<VhostIotlb>, start: F) -> io::Result<Relay>
where
    F: FnOnce(UnixListener) -> io::Result<()>,
{
    let (path, dir) = private_socket()?;
    let made = (|| {
        let listener = UnixListener::bind(&path)?;
        let daemon = UnixStream::connect(&path)?;
        start(listener)?;
        Ok::<_, io::Error>(daemon)
    })();
    let _ = std::fs::remove_file(&path);
    let _ = std::fs::remove_dir(&dir);
    let daemon = made?;

    let to_frontend = Arc::new(Mutex::new(frontend.try_clone()?));
    let f_in = frontend.try_clone()?;
    let d_out = daemon.try_clone()?;
    let d_in = daemon.try_clone()?;
    let tlb = iotlb.clone();
    let out = to_frontend.clone();
    let down = Relay::shutdown_both(&frontend, &daemon)?;
    let t1 = std::thread::Builder::new()
        .name("vhost-relay-in".into())
        .spawn(move || {
            if let Err(e) = frontend_to_daemon(&f_in, &d_out, &out, &tlb) {
                log::warn!("vhost-user relay: frontend side: {e}");
            }
            down();
        })?;
    let down = Relay::shutdown_both(&frontend, &daemon)?;
    let t2 = std::thread::Builder::new()
        .name("vhost-relay-out".into())
        .spawn(move || {
            if let Err(e) = daemon_to_frontend(&d_in, &to_frontend) {
                log::debug!("vhost-user relay: daemon side: {e}");
            }
            down();
        })?;
    Ok(Relay {
        threads: vec![t1, t2],
        frontend,
        daemon,
        iotlb,
    })
}

impl Relay {
    /// A closure that shuts both sockets down (so the other thread wakes up).
    fn shutdown_both(f: &UnixStream, d: &UnixStream) -> io::Result<impl FnOnce() + Send> {
        let (f, d) = (f.try_clone()?, d.try_clone()?);
        Ok(move || {
            let _ = f.shutdown(std::net::Shutdown::Both);
            let _ = d.shutdown(std::net::Shutdown::Both);
        })
    }
}

fn frontend_to_daemon(
    from: &UnixStream,
    to: &UnixStream,
    reply: &Mutex<UnixStream>,
    iotlb: &VhostIotlb,
) -> io::Result<()> {
    while let Some(mut m) = recv_msg(from)? {
        match m.request() {
            IOTLB_MSG => {
                let res = IotlbMsg::parse(&m.payload).and_then(|msg| iotlb.handle_msg(&msg));
                if let Err(e) = &res {
                    // The frontend chooses how often: not a warning per message.
                    log::debug!("frontend IOTLB message refused: {e}");
                }
                if m.flags() & FLAG_NEED_REPLY != 0 {
                    let mut hdr = [0u8; HDR_LEN];
                    hdr[0..4].copy_from_slice(&IOTLB_MSG.to_le_bytes());
                    hdr[4..8].copy_from_slice(&(FLAG_VERSION | FLAG_REPLY).to_le_bytes());
                    hdr[8..12].copy_from_slice(&8u32.to_le_bytes());
                    let status = u64::from(res.is_err());
                    let out = reply.lock().unwrap_or_else(|e| e.into_inner());
                    send_msg(&out, &hdr, &status.to_le_bytes(), &[])?;
                }
                continue;
            }
            SET_FEATURES => {
                if let Some(f) = le64(&m.payload, 0) {
                    iotlb.set_features(f);
                }
            }
            SET_MEM_TABLE => {
                let n = m
                    .payload
                    .get(0..4)
                    .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]) as usize);
                if let Some(r) = n.and_then(|n| regions(&m.payload, 8, n.min(MAX_FDS))) {
                    iotlb.set_regions(r);
                }
            }
            ADD_MEM_REG => {
                if let Some(r) = regions(&m.payload, 8, 1) {
                    iotlb.add_region(r[0]);
                }
            }
            REM_MEM_REG => {
                if let Some(r) = regions(&m.payload, 8, 1) {
                    iotlb.remove_region(r[0].gpa, r[0].size);
                }
            }
            SET_BACKEND_REQ_FD => {
                if let Some(fd) = m.fds.first() {
                    iotlb.set_backend_channel(UnixStream::from(fd.try_clone()?));
                }
            }
            SET_VRING_ADDR if iotlb.access_platform() => {
                // index u32, flags u32, descriptor, used, available, log (u64 each).
                let index = m
                    .payload
                    .get(0..4)
                    .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]));
                let rings = (|| {
                    Some(RingIovas {
                        desc: le64(&m.payload, 8)?,
                        used: le64(&m.payload, 16)?,
                        avail: le64(&m.payload, 24)?,
                    })
                })();
                if let (Some(index), Some(rings), Some(va)) =
                    (index, rings, iotlb.first_region_uaddr())
                {
                    log::debug!("queue {index}: ring IOVAs {rings:x?}");
                    iotlb.set_ring(index, rings);
                    for at in [8, 16, 24] {
                        if let Some(s) = m.payload.get_mut(at..at + 8) {
                            s.copy_from_slice(&va.to_le_bytes());
                        }
                    }
                }
            }
            _ => {}
        }
        send_msg(to, &m.hdr, &m.payload, &m.fds)?;
    }
    Ok(())
}

fn daemon_to_frontend(from: &UnixStream, to: &Mutex<UnixStream>) -> io::Result<()> {
    while let Some(m) = recv_msg(from)? {
        let out = to.lock().unwrap_or_else(|e| e.into_inner());
        send_msg(&out, &m.hdr, &m.payload, &m.fds)?;
    }
    Ok(())
}
