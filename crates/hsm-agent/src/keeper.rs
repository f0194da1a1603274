//! The keeper: a process that does nothing but hold the fanotify group while agents come
//! and go, so that an agent crash or upgrade never releases the group (which would answer
//! every waiting reader ALLOW: zeros, docs/KERNEL.md#when-the-group-is-released).
//!
//! It is deliberately small: one thread, blocking `poll`, no async runtime, no remote
//! access, no parsing beyond a few fixed words. Protocol, on a SOCK_SEQPACKET unix socket
//! (one message per request, descriptors by SCM_RIGHTS):
//! - `PUT` + fd: hold this group (replacing none: a second PUT is refused while one is held).
//! - `GET`: answered `FD` + the group, or `NONE`.
//! - `CLOSE`: the agent has flushed its marks and answered everything: drop the group and exit.
//! - `PING`: answered `PONG`.
//!
//! An agent keeps its connection open while it runs. When the last connection goes without
//! a `CLOSE` (a crash), the keeper waits `grace` for a new agent. If none comes it releases
//! the group safely: it removes every mark (nothing new is raised), answers every queued
//! event and every event a dead agent left unanswered with EIO, then closes the group.

use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use hsm_kernel::fanotify::{DenyErrno, Group, Response};
use hsm_kernel::fdio::{recv_fd, send_fd};
use nix::sys::socket::{
    AddressFamily, Backlog, SockFlag, SockType, UnixAddr, bind, connect, listen, socket,
};

/// The socket's file name in the state directory.
pub const SOCKET_NAME: &str = "keeper.sock";

/// Highest fd number the keeper answers when releasing the group (a dead agent's event
/// fds are below its open-file limit; numbers with no pending event are skipped by the
/// kernel with ENOENT).
const RELEASE_SWEEP: RawFd = 1 << 20;

fn seqpacket() -> std::io::Result<OwnedFd> {
    socket(
        AddressFamily::Unix,
        SockType::SeqPacket,
        SockFlag::SOCK_CLOEXEC,
        None,
    )
    .map_err(std::io::Error::from)
}

/// Run the keeper on `socket` until told to close, or until `grace` passes with no agent.
/// Returns Ok if another keeper already serves that socket.
pub fn run(socket_path: &Path, grace: Duration) -> std::io::Result<()> {
    if Client::connect(socket_path).is_ok() {
        eprintln!(
            "hsm keeper: another keeper already serves {}",
            socket_path.display()
        );
        return Ok(());
    }
    if let Some(dir) = socket_path.parent() {
        crate::journal::ensure_private_dir(dir)?;
    }
    let _ = std::fs::remove_file(socket_path);
    let listener = seqpacket()?;
    let addr = UnixAddr::new(socket_path).map_err(std::io::Error::from)?;
    bind(listener.as_raw_fd(), &addr).map_err(std::io::Error::from)?;
    listen(&listener, Backlog::new(16).map_err(std::io::Error::from)?)
        .map_err(std::io::Error::from)?;

    let mut group: Option<OwnedFd> = None;
    let mut clients: Vec<OwnedFd> = Vec::new();
    let mut alone_since: Option<Instant> = None;
    let mut buf = [0u8; 64];
    loop {
        let mut fds: Vec<nix::poll::PollFd<'_>> = Vec::with_capacity(clients.len() + 1);
        fds.push(nix::poll::PollFd::new(
            listener.as_fd(),
            nix::poll::PollFlags::POLLIN,
        ));
        for c in &clients {
            fds.push(nix::poll::PollFd::new(
                c.as_fd(),
                nix::poll::PollFlags::POLLIN,
            ));
        }
        let timeout = match alone_since {
            Some(t) => nix::poll::PollTimeout::try_from(
                grace.saturating_sub(t.elapsed()).as_millis().min(60_000) as i32,
            )
            .unwrap_or(nix::poll::PollTimeout::MAX),
            None => nix::poll::PollTimeout::NONE,
        };
        match nix::poll::poll(&mut fds, timeout) {
            Ok(_) | Err(nix::errno::Errno::EINTR) => {}
            Err(e) => return Err(e.into()),
        }
        let ready: Vec<bool> = fds
            .iter()
            .map(|f| f.revents().is_some_and(|r| !r.is_empty()))
            .collect();
        drop(fds);

        let mut gone = Vec::new();
        for (i, c) in clients.iter().enumerate() {
            if !ready[i + 1] {
                continue;
            }
            match recv_fd(c.as_fd(), &mut buf) {
                Ok((0, _)) | Err(_) => gone.push(i),
                Ok((n, fd)) => {
                    if answer(c.as_fd(), &buf[..n], fd, &mut group) == Next::Close {
                        let _ = std::fs::remove_file(socket_path);
                        return Ok(());
                    }
                }
            }
        }
        for i in gone.into_iter().rev() {
            clients.swap_remove(i);
        }
        if ready[0] {
            if let Ok(c) = hsm_kernel::fdio::accept(listener.as_fd()) {
                // Whoever connects can take the group (and answer every reader): only our
                // own user may, whatever the socket's directory allows.
                match peer_uid(&c) {
                    Some(uid) if uid == nix::unistd::geteuid().as_raw() => clients.push(c),
                    other => eprintln!(
                        "hsm keeper: refused a connection from uid {}: only uid {} may use the keeper",
                        other.map_or_else(|| "unknown".into(), |u| u.to_string()),
                        nix::unistd::geteuid()
                    ),
                }
            }
        }
        if clients.is_empty() && group.is_some() {
            let since = *alone_since.get_or_insert_with(Instant::now);
            if since.elapsed() >= grace {
                if let Some(g) = group.take() {
                    let answered = release(g);
                    eprintln!(
                        "hsm keeper: no agent for {}s: answered {answered} waiting events with EIO and released the group",
                        grace.as_secs()
                    );
                }
                let _ = std::fs::remove_file(socket_path);
                return Ok(());
            }
        } else {
            alone_since = None;
        }
    }
}

#[derive(PartialEq, Eq)]
enum Next {
    Serve,
    Close,
}

/// Answer one request from a connected agent: PUT hands the group over (with its fd), GET
/// asks for it, PING checks the keeper is alive, CLOSE drops the group (a clean stop: the
/// agent has already answered its readers) and ends the keeper.
fn answer(c: BorrowedFd<'_>, msg: &[u8], fd: Option<OwnedFd>, group: &mut Option<OwnedFd>) -> Next {
    match msg {
        b"PUT" => {
            let reply: &[u8] = match (fd, &*group) {
                (Some(fd), None) => {
                    *group = Some(fd);
                    b"OK"
                }
                (_, Some(_)) => b"HELD",
                (None, None) => b"NOFD",
            };
            let _ = send_fd(c, reply, None);
        }
        b"GET" => {
            let _ = match &*group {
                Some(g) => send_fd(c, b"FD", Some(g.as_fd())),
                None => send_fd(c, b"NONE", None),
            };
        }
        b"PING" => {
            let _ = send_fd(c, b"PONG", None);
        }
        b"CLOSE" => {
            drop(group.take());
            let _ = send_fd(c, b"OK", None);
            return Next::Close;
        }
        _ => {
            let _ = send_fd(c, b"ERR", None);
        }
    }
    Next::Serve
}

/// Release a group nobody will serve without letting any reader see zeros: no new events
/// (marks flushed), every queued event and every orphan answered EIO, then close.
fn release(fd: OwnedFd) -> usize {
    let group = Group::from_owned_fd(fd);
    let _ = group.flush_all_marks();
    let mut answered = 0;
    let mut buf = vec![0u8; 64 * 1024];
    let mut events = Vec::new();
    loop {
        events.clear();
        let r = group.read_events(&mut buf, &mut events);
        for ev in events.drain(..) {
            if let Some(fd) = ev.fd {
                if group
                    .respond(fd.as_fd(), Response::Deny(DenyErrno::Eio))
                    .is_ok()
                {
                    answered += 1;
                }
            }
        }
        if r.is_err() {
            break;
        }
    }
    for n in 0..RELEASE_SWEEP {
        if group
            .respond_number(n, Response::Deny(DenyErrno::Eio))
            .is_ok()
        {
            answered += 1;
        }
    }
    answered
}

/// An agent's connection to the keeper, kept open while the agent runs.
#[derive(Debug)]
pub struct Client {
    sock: OwnedFd,
}

impl Client {
    pub fn connect(socket_path: &Path) -> std::io::Result<Client> {
        let sock = seqpacket()?;
        let addr = UnixAddr::new(socket_path).map_err(std::io::Error::from)?;
        connect(sock.as_raw_fd(), &addr).map_err(std::io::Error::from)?;
        Ok(Client { sock })
    }

    /// Connect, starting a keeper (`EXE keeper --socket PATH --grace SECS`) if none runs.
    /// The keeper gets its own process group and session-less stdio, so it outlives the
    /// agent and the agent's terminal.
    pub fn connect_or_spawn(
        socket_path: &Path,
        grace: Duration,
        log: &Path,
    ) -> std::io::Result<Client> {
        if let Ok(c) = Client::connect(socket_path) {
            return Ok(c);
        }
        let exe = std::env::current_exe()?;
        use std::os::unix::fs::OpenOptionsExt;
        let log = std::fs::OpenOptions::new()
            .mode(0o600)
            .create(true)
            .append(true)
            .open(log)?;
        use std::os::unix::process::CommandExt;
        std::process::Command::new(exe)
            .arg("keeper")
            .arg("--socket")
            .arg(socket_path)
            .arg("--grace")
            .arg(format!("{}s", grace.as_secs().max(1)))
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(log)
            .process_group(0)
            .spawn()?;
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            match Client::connect(socket_path) {
                Ok(c) => return Ok(c),
                Err(e) if Instant::now() >= deadline => {
                    return Err(std::io::Error::other(format!(
                        "the keeper did not start listening on {}: {e}",
                        socket_path.display()
                    )));
                }
                Err(_) => std::thread::sleep(Duration::from_millis(20)),
            }
        }
    }

    fn request(
        &self,
        msg: &[u8],
        fd: Option<BorrowedFd<'_>>,
    ) -> std::io::Result<(Vec<u8>, Option<OwnedFd>)> {
        send_fd(self.sock.as_fd(), msg, fd).map_err(std::io::Error::other)?;
        let mut buf = [0u8; 64];
        let (n, got) = recv_fd(self.sock.as_fd(), &mut buf).map_err(std::io::Error::other)?;
        if n == 0 {
            return Err(std::io::Error::other("the keeper closed the connection"));
        }
        Ok((buf[..n].to_vec(), got))
    }

    /// The group the keeper holds, if any.
    pub fn get(&self) -> std::io::Result<Option<OwnedFd>> {
        match self.request(b"GET", None)? {
            (m, Some(fd)) if m == b"FD" => Ok(Some(fd)),
            (m, _) if m == b"NONE" => Ok(None),
            (m, _) => Err(std::io::Error::other(format!(
                "unexpected keeper answer {:?}",
                String::from_utf8_lossy(&m)
            ))),
        }
    }

    /// Hand the group to the keeper.
    pub fn put(&self, group: BorrowedFd<'_>) -> std::io::Result<()> {
        match self.request(b"PUT", Some(group))? {
            (m, _) if m == b"OK" => Ok(()),
            (m, _) => Err(std::io::Error::other(format!(
                "the keeper refused the group: {}",
                String::from_utf8_lossy(&m)
            ))),
        }
    }

    /// Tell the keeper to drop the group and exit (after a clean stop).
    pub fn close(&self) -> std::io::Result<()> {
        self.request(b"CLOSE", None).map(|_| ())
    }

    /// The keeper's process id (SO_PEERCRED).
    pub fn keeper_pid(&self) -> Option<u32> {
        nix::sys::socket::getsockopt(&self.sock, nix::sys::socket::sockopt::PeerCredentials)
            .ok()
            .map(|c| c.pid() as u32)
    }
}

/// The user at the other end of a connection (SO_PEERCRED).
fn peer_uid(sock: &impl std::os::fd::AsFd) -> Option<u32> {
    nix::sys::socket::getsockopt(sock, nix::sys::socket::sockopt::PeerCredentials)
        .ok()
        .map(|c| c.uid())
}

/// The socket path in a state directory.
pub fn socket_path(state_dir: &Path) -> PathBuf {
    state_dir.join(SOCKET_NAME)
}
