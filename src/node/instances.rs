//! The instance manager: runs this node's replica processes (this same
//! binary in `replica` mode), restarts one that dies, and stops it on
//! request.
//!
//! A replica lives in `<disk>/replicas/<volume>-<name>`; it listens on the
//! node's address with a port chosen when it starts and kept across its
//! restarts, so an engine reconnects to the same address.

use std::collections::HashMap;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::oneshot;

/// What the instance manager can refuse or fail at.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A name that is not a DNS label (it names a directory).
    #[error("{what} {name:?} must be 1 to 63 characters of a-z, 0-9 and '-'")]
    BadName {
        /// Which name.
        what: &'static str,
        /// The name given.
        name: String,
    },
    /// The disk is not one this node serves.
    #[error("disk {0} is not one of this node's disks")]
    UnknownDisk(String),
    /// The replica exists with another size.
    #[error("replica {name} exists with {have} bytes, not {want}")]
    SizeMismatch {
        /// The replica.
        name: String,
        /// Its size.
        have: u64,
        /// The size asked for.
        want: u64,
    },
    /// The process could not be started or did not come up.
    #[error("replica {name}: {cause}")]
    Start {
        /// The replica.
        name: String,
        /// Why.
        cause: String,
    },
    /// The directory could not be removed.
    #[error("removing {path}: {cause}")]
    Remove {
        /// The directory.
        path: String,
        /// Why.
        cause: std::io::Error,
    },
}

impl Error {
    /// The kind the agent API maps to a gRPC code.
    pub fn kind(&self) -> crate::error::ErrorKind {
        use crate::error::ErrorKind as K;
        match self {
            Self::BadName { .. } => K::InvalidArgument,
            Self::UnknownDisk(_) => K::NotFound,
            Self::SizeMismatch { .. } => K::AlreadyExists,
            Self::Start { .. } => K::Unavailable,
            Self::Remove { .. } => K::Io,
        }
    }
}

/// Whether `s` is a DNS label (safe as a path component).
pub fn is_label(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
}

/// One running (or restarting) replica.
#[derive(Debug)]
struct Replica {
    volume: String,
    name: String,
    dir: PathBuf,
    addr: String,
    size: u64,
    running: Arc<AtomicBool>,
    stop: Option<oneshot::Sender<()>>,
    done: Option<tokio::task::JoinHandle<()>>,
}

/// A snapshot of one instance, for listing.
#[derive(Debug, Clone)]
pub struct InstanceInfo {
    /// The volume.
    pub volume: String,
    /// The replica's name.
    pub name: String,
    /// Its directory.
    pub dir: PathBuf,
    /// host:port it serves on.
    pub addr: String,
    /// Whether its process is up now.
    pub running: bool,
}

/// This node's instances.
#[derive(Debug)]
pub struct Instances {
    exe: PathBuf,
    ip: IpAddr,
    disks: Vec<PathBuf>,
    replicas: Mutex<HashMap<String, Replica>>,
    /// Serialises create/delete so two calls for one replica cannot race.
    ops: tokio::sync::Mutex<()>,
}

fn free_port(ip: IpAddr) -> std::io::Result<u16> {
    Ok(std::net::TcpListener::bind((ip, 0))?.local_addr()?.port())
}

async fn wait_listening(addr: &str, deadline: Instant) -> bool {
    while Instant::now() < deadline {
        if tokio::net::TcpStream::connect(addr).await.is_ok() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    false
}

/// Runs the replica process until told to stop, restarting it when it
/// exits on its own.
async fn supervise(
    mut cmd: tokio::process::Command,
    name: String,
    running: Arc<AtomicBool>,
    mut stop: oneshot::Receiver<()>,
) {
    loop {
        let mut child = match cmd.spawn() {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(replica = %name, error = %e, "cannot start replica; retrying");
                tokio::select! {
                    () = tokio::time::sleep(Duration::from_secs(1)) => continue,
                    _ = &mut stop => return,
                }
            }
        };
        running.store(true, Ordering::SeqCst);
        tokio::select! {
            st = child.wait() => {
                running.store(false, Ordering::SeqCst);
                tracing::warn!(replica = %name, status = ?st, "replica exited; restarting");
                tokio::select! {
                    () = tokio::time::sleep(Duration::from_millis(500)) => {}
                    _ = &mut stop => return,
                }
            }
            _ = &mut stop => {
                // SIGTERM lets the replica close its files; SIGKILL if it
                // does not within ten seconds.
                if let Some(pid) = child.id().and_then(|p| i32::try_from(p).ok()) {
                    let _ = nix::sys::signal::kill(
                        nix::unistd::Pid::from_raw(pid),
                        nix::sys::signal::Signal::SIGTERM,
                    );
                }
                if tokio::time::timeout(Duration::from_secs(10), child.wait()).await.is_err() {
                    let _ = child.kill().await;
                }
                running.store(false, Ordering::SeqCst);
                return;
            }
        }
    }
}

impl Instances {
    /// An instance manager starting `exe` for replicas, serving on `ip`,
    /// over `disks`.
    pub fn new(exe: PathBuf, ip: IpAddr, disks: Vec<PathBuf>) -> Self {
        Self {
            exe,
            ip,
            disks,
            replicas: Mutex::new(HashMap::new()),
            ops: tokio::sync::Mutex::new(()),
        }
    }

    fn replica_dir(&self, volume: &str, name: &str, disk: &str) -> Result<PathBuf, Error> {
        for (what, n) in [("volume id", volume), ("replica name", name)] {
            if !is_label(n) {
                return Err(Error::BadName {
                    what,
                    name: n.to_owned(),
                });
            }
        }
        let disk = self
            .disks
            .iter()
            .find(|d| d.as_path() == Path::new(disk))
            .ok_or_else(|| Error::UnknownDisk(disk.to_owned()))?;
        Ok(disk.join("replicas").join(format!("{volume}-{name}")))
    }

    /// Creates (or finds) the replica and makes sure its process runs;
    /// returns the address it serves on.
    pub async fn create_replica(
        &self,
        volume: &str,
        name: &str,
        disk: &str,
        size: u64,
    ) -> Result<String, Error> {
        let dir = self.replica_dir(volume, name, disk)?;
        let _op = self.ops.lock().await;
        let key = format!("{volume}/{name}");
        let existing = {
            let map = self.replicas.lock().expect("poisoned");
            map.get(&key).map(|r| (r.addr.clone(), r.size))
        };
        if let Some((addr, have)) = existing {
            if have != size {
                return Err(Error::SizeMismatch {
                    name: name.to_owned(),
                    have,
                    want: size,
                });
            }
            return Ok(addr);
        }
        let fail = |cause: String| Error::Start {
            name: name.to_owned(),
            cause,
        };
        let port = free_port(self.ip).map_err(|e| fail(e.to_string()))?;
        let addr = std::net::SocketAddr::new(self.ip, port).to_string();
        let mut cmd = tokio::process::Command::new(&self.exe);
        cmd.arg("replica")
            .arg("--dir")
            .arg(&dir)
            .args([
                "--size",
                &size.to_string(),
                "--listen",
                &addr,
                "--volume",
                volume,
            ])
            .stdin(std::process::Stdio::null())
            .kill_on_drop(true);
        let running = Arc::new(AtomicBool::new(false));
        let (stop_tx, stop_rx) = oneshot::channel();
        let done = tokio::spawn(supervise(cmd, name.to_owned(), running.clone(), stop_rx));
        let up = wait_listening(&addr, Instant::now() + Duration::from_secs(20)).await;
        let r = Replica {
            volume: volume.to_owned(),
            name: name.to_owned(),
            dir,
            addr: addr.clone(),
            size,
            running,
            stop: Some(stop_tx),
            done: Some(done),
        };
        if !up {
            Self::stop(r).await;
            return Err(fail(format!("did not start listening on {addr}")));
        }
        tracing::info!(volume.id = %volume, replica.addr = %addr, replica = %name, "replica started");
        self.replicas.lock().expect("poisoned").insert(key, r);
        Ok(addr)
    }

    async fn stop(mut r: Replica) {
        if let Some(s) = r.stop.take() {
            let _ = s.send(());
        }
        if let Some(d) = r.done.take() {
            let _ = d.await;
        }
    }

    /// Stops the replica's process (if any) and removes its directory.
    pub async fn delete_replica(&self, volume: &str, name: &str, disk: &str) -> Result<(), Error> {
        let dir = self.replica_dir(volume, name, disk)?;
        let _op = self.ops.lock().await;
        let r = self
            .replicas
            .lock()
            .expect("poisoned")
            .remove(&format!("{volume}/{name}"));
        if let Some(r) = r {
            Self::stop(r).await;
        }
        match std::fs::remove_dir_all(&dir) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(cause) => {
                return Err(Error::Remove {
                    path: dir.display().to_string(),
                    cause,
                })
            }
        }
        tracing::info!(volume.id = %volume, replica = %name, "replica deleted");
        Ok(())
    }

    /// Every replica this node runs.
    pub fn list(&self) -> Vec<InstanceInfo> {
        let mut v: Vec<_> = self
            .replicas
            .lock()
            .expect("poisoned")
            .values()
            .map(|r| InstanceInfo {
                volume: r.volume.clone(),
                name: r.name.clone(),
                dir: r.dir.clone(),
                addr: r.addr.clone(),
                running: r.running.load(Ordering::SeqCst),
            })
            .collect();
        v.sort_by(|a, b| (&a.volume, &a.name).cmp(&(&b.volume, &b.name)));
        v
    }

    /// Stops every process (the node is shutting down).
    pub async fn stop_all(&self) {
        let all: Vec<Replica> = self
            .replicas
            .lock()
            .expect("poisoned")
            .drain()
            .map(|(_, r)| r)
            .collect();
        for r in all {
            Self::stop(r).await;
        }
    }
}
