//! The instance manager: runs this node's replica and engine processes
//! (this same binary in `replica` and `engine` modes), restarts one that
//! dies, and stops it on request.
//!
//! A replica lives in `<disk>/replicas/<volume>-<name>`; it listens on the
//! node's address with a port chosen when it starts and kept across its
//! restarts, so an engine reconnects to the same address.
//!
//! An engine serves its volume through the FUSE frontend as the file
//! `<state>/engines/<volume>/volume` (NodeStage puts a loop device over
//! it), and its control API on loopback with a port kept across restarts.

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
    /// The volume has an engine here already, of another size.
    #[error("volume {volume} has an engine of {have} bytes here, not {want}")]
    EngineMismatch {
        /// The volume.
        volume: String,
        /// Its engine's size.
        have: u64,
        /// The size asked for.
        want: u64,
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
            Self::SizeMismatch { .. } | Self::EngineMismatch { .. } => K::AlreadyExists,
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

/// A process kept running by [`supervise`] until stopped.
#[derive(Debug)]
struct Supervised {
    running: Arc<AtomicBool>,
    stop: Option<oneshot::Sender<()>>,
    done: Option<tokio::task::JoinHandle<()>>,
}

impl Supervised {
    fn spawn(mut cmd: tokio::process::Command, label: String) -> Self {
        cmd.stdin(std::process::Stdio::null()).kill_on_drop(true);
        let running = Arc::new(AtomicBool::new(false));
        let (stop_tx, stop_rx) = oneshot::channel();
        let done = tokio::spawn(supervise(cmd, label, running.clone(), stop_rx));
        Self {
            running,
            stop: Some(stop_tx),
            done: Some(done),
        }
    }

    fn running(&self) -> bool {
        self.running.load(Ordering::SeqCst)
    }

    /// Stops the process (SIGTERM, then SIGKILL after ten seconds) and
    /// waits until it is gone.
    async fn stop(mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(d) = self.done.take() {
            let _ = d.await;
        }
    }
}

/// One running (or restarting) replica.
#[derive(Debug)]
struct Replica {
    volume: String,
    name: String,
    dir: PathBuf,
    addr: String,
    size: u64,
    proc: Supervised,
}

/// One volume's engine.
#[derive(Debug)]
struct Engine {
    size: u64,
    control: String,
    path: PathBuf,
    proc: Supervised,
}

/// How a started engine is reached.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EngineInfo {
    /// The volume.
    pub volume: String,
    /// The FUSE file serving the volume.
    pub path: PathBuf,
    /// host:port of its control API.
    pub control: String,
    /// Whether its process is up now.
    pub running: bool,
}

/// A snapshot of one replica, for listing.
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
    state: PathBuf,
    replicas: Mutex<HashMap<String, Replica>>,
    engines: Mutex<HashMap<String, Engine>>,
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

/// How long an engine may take to open its replicas and mount its
/// frontend.
const ENGINE_START: Duration = Duration::from_secs(30);

/// Waits until the engine's control API answers a status call: it serves
/// that only once its frontend is mounted.
async fn wait_engine(control: &str, deadline: Instant) -> Result<(), String> {
    use crate::engine::control::{pb, EngineClient};
    let mut last = String::from("no answer");
    while Instant::now() < deadline {
        let ep = tonic::transport::Endpoint::from_shared(format!("http://{control}"))
            .map_err(|e| e.to_string())?
            .connect_timeout(Duration::from_secs(2))
            .timeout(Duration::from_secs(2));
        match ep.connect().await {
            Ok(ch) => match EngineClient::new(ch).status(pb::StatusRequest {}).await {
                Ok(_) => return Ok(()),
                Err(e) => last = e.message().to_owned(),
            },
            Err(e) => last = e.to_string(),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Err(format!(
        "its control API at {control} did not answer: {last}"
    ))
}

/// Runs an instance's process until told to stop, restarting it when it
/// exits on its own.
async fn supervise(
    mut cmd: tokio::process::Command,
    label: String,
    running: Arc<AtomicBool>,
    mut stop: oneshot::Receiver<()>,
) {
    loop {
        let mut child = match cmd.spawn() {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(instance = %label, error = %e, "cannot start; retrying");
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
                tracing::warn!(instance = %label, status = ?st, "exited; restarting");
                tokio::select! {
                    () = tokio::time::sleep(Duration::from_millis(500)) => {}
                    _ = &mut stop => return,
                }
            }
            _ = &mut stop => {
                // SIGTERM lets a replica close its files and an engine
                // unmount and flush; SIGKILL if it does not within ten
                // seconds.
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
    /// An instance manager starting `exe` for replicas serving on `ip`
    /// over `disks`, and for engines whose files live under `state`.
    pub fn new(exe: PathBuf, ip: IpAddr, disks: Vec<PathBuf>, state: PathBuf) -> Self {
        Self {
            exe,
            ip,
            disks,
            state,
            replicas: Mutex::new(HashMap::new()),
            engines: Mutex::new(HashMap::new()),
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
        cmd.arg("replica").arg("--dir").arg(&dir).args([
            "--size",
            &size.to_string(),
            "--listen",
            &addr,
            "--volume",
            volume,
        ]);
        let proc = Supervised::spawn(cmd, format!("replica {volume}/{name}"));
        if !wait_listening(&addr, Instant::now() + Duration::from_secs(20)).await {
            proc.stop().await;
            return Err(fail(format!("did not start listening on {addr}")));
        }
        let r = Replica {
            volume: volume.to_owned(),
            name: name.to_owned(),
            dir,
            addr: addr.clone(),
            size,
            proc,
        };
        tracing::info!(volume.id = %volume, replica.addr = %addr, replica = %name, "replica started");
        self.replicas.lock().expect("poisoned").insert(key, r);
        Ok(addr)
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
            r.proc.stop().await;
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
                running: r.proc.running(),
            })
            .collect();
        v.sort_by(|a, b| (&a.volume, &a.name).cmp(&(&b.volume, &b.name)));
        v
    }

    /// Stops every process (the node is shutting down): engines first, so
    /// each flushes to replicas that still run.
    pub async fn stop_all(&self) {
        let engines: Vec<Engine> = self
            .engines
            .lock()
            .expect("poisoned")
            .drain()
            .map(|(_, e)| e)
            .collect();
        futures_util::future::join_all(engines.into_iter().map(|e| e.proc.stop())).await;
        let all: Vec<Replica> = self
            .replicas
            .lock()
            .expect("poisoned")
            .drain()
            .map(|(_, r)| r)
            .collect();
        futures_util::future::join_all(all.into_iter().map(|r| r.proc.stop())).await;
    }

    /// The file the FUSE frontend of `volume`'s engine serves on this node.
    pub fn engine_file(&self, volume: &str) -> Result<PathBuf, Error> {
        if !is_label(volume) {
            return Err(Error::BadName {
                what: "volume id",
                name: volume.to_owned(),
            });
        }
        Ok(self.state.join("engines").join(volume).join("volume"))
    }

    /// Starts (or finds) `volume`'s engine over `replicas` and waits until
    /// its frontend serves.
    pub async fn start_engine(
        &self,
        volume: &str,
        size: u64,
        replicas: &[String],
    ) -> Result<EngineInfo, Error> {
        let path = self.engine_file(volume)?;
        let _op = self.ops.lock().await;
        if let Some(e) = self.engines.lock().expect("poisoned").get(volume) {
            if e.size != size {
                return Err(Error::EngineMismatch {
                    volume: volume.to_owned(),
                    have: e.size,
                    want: size,
                });
            }
            return Ok(EngineInfo {
                volume: volume.to_owned(),
                path: e.path.clone(),
                control: e.control.clone(),
                running: e.proc.running(),
            });
        }
        let fail = |cause: String| Error::Start {
            name: format!("engine of {volume}"),
            cause,
        };
        let dir = crate::parent_dir(&path).expect("engine file has a directory");
        std::fs::create_dir_all(dir).map_err(|e| fail(format!("{}: {e}", dir.display())))?;
        let lo = IpAddr::from([127, 0, 0, 1]);
        let control =
            std::net::SocketAddr::new(lo, free_port(lo).map_err(|e| fail(e.to_string()))?)
                .to_string();
        let mut cmd = tokio::process::Command::new(&self.exe);
        cmd.arg("engine")
            .args(["--volume", volume, "--size", &size.to_string()])
            .args(["--control", &control, "--frontend", "fuse", "--path"])
            .arg(&path);
        for r in replicas {
            cmd.args(["--replica", r]);
        }
        let proc = Supervised::spawn(cmd, format!("engine {volume}"));
        if let Err(cause) = wait_engine(&control, Instant::now() + ENGINE_START).await {
            proc.stop().await;
            return Err(fail(cause));
        }
        tracing::info!(volume.id = %volume, control = %control, path = %path.display(), "engine started");
        let info = EngineInfo {
            volume: volume.to_owned(),
            path: path.clone(),
            control: control.clone(),
            running: true,
        };
        self.engines.lock().expect("poisoned").insert(
            volume.to_owned(),
            Engine {
                size,
                control,
                path,
                proc,
            },
        );
        Ok(info)
    }

    /// Stops `volume`'s engine if it runs here.
    pub async fn stop_engine(&self, volume: &str) -> Result<(), Error> {
        self.engine_file(volume)?;
        let _op = self.ops.lock().await;
        let e = self.engines.lock().expect("poisoned").remove(volume);
        if let Some(e) = e {
            e.proc.stop().await;
            tracing::info!(volume.id = %volume, "engine stopped");
        }
        Ok(())
    }

    /// The engine of `volume`, if this node runs one.
    pub fn engine(&self, volume: &str) -> Option<EngineInfo> {
        self.engines
            .lock()
            .expect("poisoned")
            .get(volume)
            .map(|e| EngineInfo {
                volume: volume.to_owned(),
                path: e.path.clone(),
                control: e.control.clone(),
                running: e.proc.running(),
            })
    }

    /// Every engine this node runs.
    pub fn engines(&self) -> Vec<EngineInfo> {
        let mut v: Vec<_> = self
            .engines
            .lock()
            .expect("poisoned")
            .keys()
            .cloned()
            .collect::<Vec<_>>()
            .into_iter()
            .filter_map(|k| self.engine(&k))
            .collect();
        v.sort_by(|a, b| a.volume.cmp(&b.volume));
        v
    }
}
