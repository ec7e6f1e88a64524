//! Free TCP ports on the loopback interface, for servers started on this machine: a port that
//! was free a moment ago ([`free_port`]), or one reserved against every other process that
//! reserves ports ([`reserve_port`]).

use std::collections::HashSet;
use std::fs::{File, OpenOptions, TryLockError};
use std::io;
use std::net::{Ipv4Addr, TcpListener};
use std::path::PathBuf;
use std::sync::{Mutex, OnceLock};

/// A TCP port on 127.0.0.1 that was free a moment ago (bind to port 0, read, drop).
///
/// Ports handed out before by this process are skipped, so servers started together never
/// get the same port. Another process can still take it before the server binds; starts
/// with generated ports retry on "address already in use".
pub fn free_port() -> u16 {
    static HANDED_OUT: OnceLock<Mutex<HashSet<u16>>> = OnceLock::new();
    let handed_out = HANDED_OUT.get_or_init(Default::default);
    loop {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).expect("bind 127.0.0.1:0");
        let port = listener.local_addr().expect("local_addr of a bound listener").port();
        let mut seen = handed_out.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if seen.insert(port) {
            return port;
        }
    }
}

/// A loopback port reserved by this process until dropped (see [`reserve_port`]).
#[derive(Debug)]
pub struct ReservedPort {
    port: u16,
    _lock: File,
}

impl ReservedPort {
    pub fn port(&self) -> u16 {
        self.port
    }
}

/// How many ports [`reserve_port`] tries after the preferred one.
const RESERVE_ATTEMPTS: usize = 64;

/// Reserves `preferred` when it is free and not reserved by another process (0: no
/// preference), else any free port, reserved the same way.
///
/// "Free" alone is a check-then-bind race: two `cimctl up` starting at the same instant both
/// find 8222 free and both hand it to their nats-server, and one fails. A reservation closes
/// it between processes that reserve: an exclusive advisory lock (`flock`) on
/// `<temp dir>/cim-ports/<port>.lock`, taken *before* the port is checked and held for as long
/// as the [`ReservedPort`] lives (the reserver's lifetime: the kernel drops the lock when the
/// process dies, so a crash leaves nothing to clean up; the fd is close-on-exec, so children
/// do not hold it). A second reserver cannot lock the same port and takes another. A program
/// that does not reserve can still take the port before its server binds; that is no worse
/// than before.
pub fn reserve_port(preferred: u16) -> io::Result<ReservedPort> {
    if preferred != 0
        && let Some(reserved) = try_reserve(preferred)?
    {
        return Ok(reserved);
    }
    for _ in 0..RESERVE_ATTEMPTS {
        if let Some(reserved) = try_reserve(free_port())? {
            return Ok(reserved);
        }
    }
    Err(io::Error::new(
        io::ErrorKind::AddrInUse,
        format!("no free loopback port that another process has not reserved, after {RESERVE_ATTEMPTS} tries"),
    ))
}

/// The port's lock, if no other process (or other reservation of this one) holds it and the
/// port is free now.
fn try_reserve(port: u16) -> io::Result<Option<ReservedPort>> {
    let dir = lock_dir()?;
    let path = dir.join(format!("{port}.lock"));
    let file = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .or_else(|_| File::open(&path))
        .map_err(|e| io::Error::new(e.kind(), format!("port reservation {}: {e}", path.display())))?;
    match file.try_lock() {
        Ok(()) => {}
        Err(TryLockError::WouldBlock) => return Ok(None),
        Err(TryLockError::Error(e)) => {
            return Err(io::Error::new(e.kind(), format!("locking {}: {e}", path.display())));
        }
    }
    if TcpListener::bind((Ipv4Addr::LOCALHOST, port)).is_err() {
        return Ok(None);
    }
    Ok(Some(ReservedPort { port, _lock: file }))
}

/// `<temp dir>/cim-ports`, shared by every user of the machine (sticky and world-writable,
/// like /tmp itself, since ports are too).
fn lock_dir() -> io::Result<PathBuf> {
    use std::os::unix::fs::PermissionsExt;
    let dir = std::env::temp_dir().join("cim-ports");
    if !dir.is_dir() {
        std::fs::create_dir_all(&dir).map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", dir.display())))?;
        let _ = std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o1777));
    }
    Ok(dir)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_reserved_port_is_not_reserved_again_until_dropped() {
        let first = reserve_port(0).unwrap();
        let again = reserve_port(first.port()).unwrap();
        assert_ne!(again.port(), first.port(), "a held reservation is never handed out twice");
        let port = first.port();
        drop(first);
        drop(again);
        let lock = File::open(lock_dir().unwrap().join(format!("{port}.lock"))).unwrap();
        assert!(lock.try_lock().is_ok(), "a dropped reservation releases its lock");
    }

    #[test]
    fn a_bound_port_is_not_reserved() {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
        let taken = listener.local_addr().unwrap().port();
        assert_ne!(reserve_port(taken).unwrap().port(), taken);
    }

    #[test]
    fn free_ports_are_distinct() {
        let ports: HashSet<u16> = (0..50).map(|_| free_port()).collect();
        assert_eq!(ports.len(), 50);
    }
}
