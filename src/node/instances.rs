//! The instance manager: runs this node's replica and engine processes
//! (this same binary in `replica` and `engine` modes), restarts one that
//! dies, stops it on request, and finds them again after the node plugin
//! itself restarts.
//!
//! A replica lives in `<disk>/replicas/<volume>-<name>`; it listens on the
//! node's address with a port chosen when it starts and kept across its
//! restarts, so an engine reconnects to the same address.
//!
//! An engine serves its volume through the FUSE frontend as the file
//! `<state>/engines/<volume>/volume` (NodeStage puts a loop device over
//! it), or as an iSCSI target on a loopback portal; which one is decided
//! when the engine starts (`attach::choose`), so an iscsid started after
//! the node plugin is used from the next attach on. Its control API is on
//! loopback with a port kept across restarts.
//!
//! Every instance has a record, `<state>/instances/<kind>.<volume>.<name>.json`,
//! holding its exact command line. It is written (fsynced, renamed into
//! place) before the process starts and removed only after the process is
//! gone, so it always covers every process this node may have running.
//! Processes run in their own process group and outlive a node plugin
//! that is killed; [`Instances::recover`] reads the records when the node
//! starts, adopts each process still running (found by its command line
//! in `/proc`) and starts the ones that are not.

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use tokio::sync::oneshot;

use super::attach::{Frontend, Served};
use crate::replica::client::Client;
use crate::replica::copy;

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
    /// No such instance runs on this node.
    #[error("{0} does not run on this node")]
    NotHere(String),
    /// The instance refused or failed an operation.
    #[error("{what}: {cause}")]
    Refused {
        /// The operation.
        what: String,
        /// Why, in the instance's words.
        cause: String,
        /// Its kind.
        kind: crate::error::ErrorKind,
    },
    /// A directory or record could not be written or removed.
    #[error("{what} {path}: {cause}")]
    Os {
        /// The operation.
        what: &'static str,
        /// Its path.
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
            Self::Os { .. } => K::Io,
            Self::NotHere(_) => K::NotFound,
            Self::Refused { kind, .. } => *kind,
        }
    }
}

/// A replica's refusal of `what`, kept with its kind.
fn replica_refused(what: &str, e: &crate::replica::client::ClientError) -> Error {
    Error::Refused {
        what: what.to_owned(),
        kind: e.kind(),
        cause: e.to_string(),
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

/// Which binary mode an instance runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    /// `shorthorn replica`.
    Replica,
    /// `shorthorn engine`.
    Engine,
}

/// What an instance is: everything needed to start it again, as stored in
/// its record.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Spec {
    /// Replica or engine.
    pub kind: Kind,
    /// The volume.
    pub volume: String,
    /// The replica's name; `engine` for an engine.
    pub name: String,
    /// Volume size in bytes.
    pub size: u64,
    /// host:port it serves on (an engine's control API).
    pub addr: String,
    /// A replica's directory, or an engine's FUSE file.
    pub path: PathBuf,
    /// The arguments after the executable.
    pub args: Vec<String>,
}

impl Spec {
    fn key(&self) -> String {
        key(self.kind, &self.volume, &self.name)
    }

    /// The arguments to start it with now: a replica that exists already
    /// starts without `--size` (which only creates), so one grown since
    /// its record was written still opens.
    fn command_args(&self) -> Vec<String> {
        if self.kind == Kind::Replica && self.path.join(crate::replica::meta::VOLUME_META).exists()
        {
            without_size(&self.args)
        } else {
            self.args.clone()
        }
    }
}

/// `args` without its `--size N` pair: the size changes when a volume
/// grows.
fn without_size(args: &[String]) -> Vec<String> {
    without(args, &["--size"])
}

/// What identifies a running instance in `/proc`: its arguments without
/// those that change while it runs (`--size` when a volume grows,
/// `--replica` when an engine's replicas are replaced), so a process
/// started before a change is still adopted after it.
fn identity(args: &[String]) -> Vec<String> {
    without(args, &["--size", "--replica"])
}

fn without(args: &[String], flags: &[&str]) -> Vec<String> {
    let mut out = Vec::with_capacity(args.len());
    let mut it = args.iter();
    while let Some(a) = it.next() {
        if flags.contains(&a.as_str()) {
            it.next();
        } else {
            out.push(a.clone());
        }
    }
    out
}

fn key(kind: Kind, volume: &str, name: &str) -> String {
    let k = match kind {
        Kind::Replica => "replica",
        Kind::Engine => "engine",
    };
    // Volume ids and names are labels: no dots, so the key is unambiguous.
    format!("{k}.{volume}.{name}")
}

/// A snapshot of one instance, for listing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InstanceInfo {
    /// What it is.
    pub spec: Spec,
    /// Whether its process is up now.
    pub running: bool,
}

impl InstanceInfo {
    /// Where an engine serves its volume, read from its own arguments (an
    /// engine adopted from before a change of the node's frontend keeps
    /// the one it was started with).
    pub fn served(&self) -> Served {
        let arg = |flag: &str| {
            let at = self.spec.args.iter().position(|a| a == flag)?;
            self.spec.args.get(at + 1).cloned()
        };
        match arg("--portal") {
            Some(portal) => Served::Iscsi {
                portal,
                iqn: iqn(&self.spec.volume),
            },
            None => Served::Fuse {
                file: self.spec.path.clone(),
            },
        }
    }
}

/// The iSCSI target name the engine of `volume` serves (the volume id is a
/// label, so it always makes a valid name).
pub fn iqn(volume: &str) -> String {
    format!("{}:{volume}", crate::frontend::iscsi::IQN_PREFIX)
}

/// A process kept running by [`supervise`] until stopped.
#[derive(Debug)]
struct Supervised {
    running: Arc<AtomicBool>,
    stop: Option<oneshot::Sender<()>>,
    done: Option<tokio::task::JoinHandle<()>>,
}

impl Supervised {
    /// Supervises `spec`'s process: the running one `adopted`, else one
    /// `starter` starts.
    fn spawn(starter: &Starter, spec: Arc<Mutex<Spec>>, adopted: Option<Pid>) -> Self {
        let running = Arc::new(AtomicBool::new(false));
        let (stop_tx, stop_rx) = oneshot::channel();
        let done = tokio::spawn(supervise(
            starter.clone(),
            spec,
            running.clone(),
            stop_rx,
            adopted,
        ));
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

    /// Stops watching the process and leaves it running.
    async fn abandon(mut self) {
        if let Some(d) = self.done.take() {
            d.abort();
            let _ = d.await;
        }
    }
}

#[derive(Debug)]
struct Instance {
    /// Shared with its supervisor, which starts the process from it.
    spec: Arc<Mutex<Spec>>,
    proc: Supervised,
}

impl Instance {
    fn spec(&self) -> Spec {
        self.spec.lock().expect("poisoned").clone()
    }

    fn info(&self) -> InstanceInfo {
        InstanceInfo {
            spec: self.spec(),
            running: self.proc.running(),
        }
    }
}

/// This node's instances.
#[derive(Debug)]
pub struct Instances {
    starter: Starter,
    ip: IpAddr,
    disks: Vec<PathBuf>,
    state: PathBuf,
    /// The frontend asked for; `None`: chosen at each engine start.
    frontend: Option<Frontend>,
    live: Mutex<BTreeMap<String, Instance>>,
    /// Serialises starts and stops so two calls for one instance cannot
    /// race.
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

/// How long a stopped process may take to exit before it is killed.
const STOP_GRACE: Duration = Duration::from_secs(10);

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

/// A process this supervisor watches: its own child, or one that is not
/// (adopted from a previous node plugin, or started by the launcher): that
/// one can only be polled.
enum Live {
    Child(tokio::process::Child),
    Polled(Pid),
}

impl Live {
    fn pid(&self) -> Option<Pid> {
        match self {
            Self::Child(c) => c
                .id()
                .and_then(|p| i32::try_from(p).ok())
                .map(Pid::from_raw),
            Self::Polled(p) => Some(*p),
        }
    }

    /// Resolves when the process has exited.
    async fn exited(&mut self) -> String {
        match self {
            Self::Child(c) => format!("{:?}", c.wait().await),
            Self::Polled(p) => {
                while alive(*p) {
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                "exited (not this node plugin's child)".to_owned()
            }
        }
    }

    /// SIGTERM, which lets a replica close its files and an engine unmount
    /// and flush; SIGKILL if it is still there after [`STOP_GRACE`].
    async fn terminate(mut self) {
        if let Some(pid) = self.pid() {
            let _ = kill(pid, Signal::SIGTERM);
        }
        if tokio::time::timeout(STOP_GRACE, self.exited())
            .await
            .is_err()
        {
            if let Some(pid) = self.pid() {
                let _ = kill(pid, Signal::SIGKILL);
            }
            let _ = self.exited().await;
        }
    }
}

/// Whether `pid` is a live process (not a zombie waiting to be reaped).
fn alive(pid: Pid) -> bool {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return false;
    };
    // The state letter follows the parenthesised command name.
    !matches!(
        stat.rsplit_once(')')
            .and_then(|(_, rest)| rest.trim_start().chars().next()),
        Some('Z' | 'X') | None
    )
}

/// Running processes by their arguments (after the executable, without
/// `--size`), from `/proc/*/cmdline`.
fn processes_by_args() -> BTreeMap<Vec<String>, Pid> {
    let mut found = BTreeMap::new();
    let Ok(rd) = std::fs::read_dir("/proc") else {
        return found;
    };
    for e in rd.flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else {
            continue;
        };
        let Ok(raw) = std::fs::read(e.path().join("cmdline")) else {
            continue;
        };
        let mut argv: Vec<String> = raw
            .split(|b| *b == 0)
            .map(|a| String::from_utf8_lossy(a).into_owned())
            .collect();
        if argv.last().is_some_and(String::is_empty) {
            argv.pop();
        }
        if argv.len() > 1 && alive(Pid::from_raw(pid)) {
            found.insert(identity(&argv.split_off(1)), Pid::from_raw(pid));
        }
    }
    found
}

/// Runs an instance's process until told to stop, restarting it when it
/// exits on its own. `adopted` is a process already running it.
async fn supervise(
    starter: Starter,
    spec: Arc<Mutex<Spec>>,
    running: Arc<AtomicBool>,
    mut stop: oneshot::Receiver<()>,
    mut adopted: Option<Pid>,
) {
    let label = spec.lock().expect("poisoned").key();
    loop {
        let spawned = match adopted.take() {
            Some(pid) => Ok(Live::Polled(pid)),
            None => {
                let args = spec.lock().expect("poisoned").command_args();
                starter.start(&args).await
            }
        };
        let mut live = match spawned {
            Ok(l) => l,
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
            st = live.exited() => {
                running.store(false, Ordering::SeqCst);
                tracing::warn!(instance = %label, status = %st, "exited; restarting");
                tokio::select! {
                    () = tokio::time::sleep(Duration::from_millis(500)) => {}
                    _ = &mut stop => return,
                }
            }
            _ = &mut stop => {
                live.terminate().await;
                running.store(false, Ordering::SeqCst);
                return;
            }
        }
    }
}

/// How this node starts its replica and engine processes.
#[derive(Debug, Clone)]
pub enum Starter {
    /// As its own children, running this executable: they outlive the node
    /// plugin's process but not its container.
    Fork(PathBuf),
    /// Through a [`super::launcher`] at this socket, so they live in the
    /// launcher's container and outlive the node plugin's.
    Launcher(PathBuf),
}

impl Starter {
    async fn start(&self, args: &[String]) -> Result<Live, String> {
        match self {
            Self::Fork(exe) => super::launcher::spawn_detached(exe, args).map(Live::Child),
            Self::Launcher(socket) => super::launcher::launch(socket, args)
                .await
                .map(Live::Polled)
                .map_err(|e| e.to_string()),
        }
    }
}

fn os(what: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> Error {
    let path = path.display().to_string();
    move |cause| Error::Os { what, path, cause }
}

impl Instances {
    /// An instance manager starting processes with `starter` for replicas serving on `ip`
    /// over `disks`, and for engines; its records and engines' files live
    /// under `state`.
    pub fn new(
        starter: Starter,
        ip: IpAddr,
        disks: Vec<PathBuf>,
        state: PathBuf,
        frontend: Option<Frontend>,
    ) -> Self {
        Self {
            starter,
            ip,
            disks,
            state,
            frontend,
            live: Mutex::new(BTreeMap::new()),
            ops: tokio::sync::Mutex::new(()),
        }
    }

    fn records(&self) -> PathBuf {
        self.state.join("instances")
    }

    fn record_path(&self, key: &str) -> PathBuf {
        self.records().join(format!("{key}.json"))
    }

    /// Writes `spec`'s record durably: a crash leaves the old record or
    /// the new one, never a torn one.
    fn save(&self, spec: &Spec) -> Result<(), Error> {
        use std::io::Write;
        let dir = self.records();
        std::fs::create_dir_all(&dir).map_err(os("creating", &dir))?;
        let path = self.record_path(&spec.key());
        let tmp = path.with_extension("tmp");
        let mut f = std::fs::File::create(&tmp).map_err(os("writing", &tmp))?;
        f.write_all(&serde_json::to_vec_pretty(spec).expect("specs serialize"))
            .and_then(|()| f.sync_all())
            .map_err(os("writing", &tmp))?;
        std::fs::rename(&tmp, &path).map_err(os("renaming", &tmp))?;
        std::fs::File::open(&dir)
            .and_then(|d| d.sync_all())
            .map_err(os("syncing", &dir))
    }

    fn forget(&self, key: &str) -> Result<(), Error> {
        let path = self.record_path(key);
        match std::fs::remove_file(&path) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(os("removing", &path)(e)),
            _ => Ok(()),
        }
    }

    /// Reads every record and makes its instance run again: adopts the
    /// process still running it, or starts one. Called once when the node
    /// starts, before it serves. Returns how many were adopted and started.
    pub fn recover(&self) -> Result<(usize, usize), Error> {
        let dir = self.records();
        let rd = match std::fs::read_dir(&dir) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok((0, 0)),
            r => r.map_err(os("listing", &dir))?,
        };
        let running = processes_by_args();
        let (mut adopted, mut started) = (0, 0);
        let mut live = self.live.lock().expect("poisoned");
        for e in rd.flatten() {
            let path = e.path();
            if path.extension().is_none_or(|x| x != "json") {
                continue;
            }
            let spec: Spec = match std::fs::read(&path)
                .map_err(|e| e.to_string())
                .and_then(|b| serde_json::from_slice(&b).map_err(|e| e.to_string()))
            {
                Ok(s) => s,
                Err(e) => {
                    tracing::error!(record = %path.display(), error = %e, "unreadable instance record; skipped");
                    continue;
                }
            };
            let pid = running.get(&identity(&spec.args)).copied();
            if pid.is_some() {
                adopted += 1;
            } else {
                started += 1;
            }
            tracing::info!(instance = %spec.key(), adopted = pid.is_some(), "instance recovered");
            let key = spec.key();
            let spec = Arc::new(Mutex::new(spec));
            let proc = Supervised::spawn(&self.starter, spec.clone(), pid);
            live.insert(key, Instance { spec, proc });
        }
        Ok((adopted, started))
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

    fn get(&self, key: &str) -> Option<InstanceInfo> {
        self.live
            .lock()
            .expect("poisoned")
            .get(key)
            .map(Instance::info)
    }

    /// Changes the record of instance `key` with `f` (durably) and the
    /// spec its supervisor restarts it from.
    fn update(&self, key: &str, f: impl FnOnce(&mut Spec)) -> Result<(), Error> {
        let shared = self
            .live
            .lock()
            .expect("poisoned")
            .get(key)
            .map(|i| i.spec.clone())
            .ok_or_else(|| Error::NotHere(key.to_owned()))?;
        let mut next = shared.lock().expect("poisoned").clone();
        f(&mut next);
        self.save(&next)?;
        *shared.lock().expect("poisoned") = next;
        Ok(())
    }

    /// Records `spec`, starts its process and waits until `ready` says it
    /// serves; on failure stops it and forgets it again.
    async fn launch<F, Fut>(&self, spec: Spec, ready: F) -> Result<InstanceInfo, Error>
    where
        F: FnOnce(String) -> Fut,
        Fut: std::future::Future<Output = Result<(), String>>,
    {
        self.save(&spec)?;
        let shared = Arc::new(Mutex::new(spec.clone()));
        let proc = Supervised::spawn(&self.starter, shared.clone(), None);
        if let Err(cause) = ready(spec.addr.clone()).await {
            proc.stop().await;
            self.forget(&spec.key())?;
            return Err(Error::Start {
                name: spec.key(),
                cause,
            });
        }
        tracing::info!(volume.id = %spec.volume, instance = %spec.key(), addr = %spec.addr, "instance started");
        let info = InstanceInfo {
            spec: spec.clone(),
            running: true,
        };
        self.live
            .lock()
            .expect("poisoned")
            .insert(spec.key(), Instance { spec: shared, proc });
        Ok(info)
    }

    /// Stops the instance `key` if it runs and forgets it.
    async fn halt(&self, key: &str) -> Result<(), Error> {
        let i = self.live.lock().expect("poisoned").remove(key);
        if let Some(i) = i {
            i.proc.stop().await;
        }
        self.forget(key)
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
        if let Some(i) = self.get(&key(Kind::Replica, volume, name)) {
            if i.spec.size != size {
                return Err(Error::SizeMismatch {
                    name: name.to_owned(),
                    have: i.spec.size,
                    want: size,
                });
            }
            return Ok(i.spec.addr);
        }
        let port = free_port(self.ip).map_err(|e| Error::Start {
            name: name.to_owned(),
            cause: e.to_string(),
        })?;
        let addr = std::net::SocketAddr::new(self.ip, port).to_string();
        let args = [
            "replica",
            "--dir",
            &dir.to_string_lossy(),
            "--size",
            &size.to_string(),
            "--listen",
            &addr,
            "--volume",
            volume,
        ]
        .map(str::to_owned)
        .to_vec();
        let spec = Spec {
            kind: Kind::Replica,
            volume: volume.to_owned(),
            name: name.to_owned(),
            size,
            addr,
            path: dir,
            args,
        };
        let info = self
            .launch(spec, |addr| async move {
                if wait_listening(&addr, Instant::now() + Duration::from_secs(20)).await {
                    Ok(())
                } else {
                    Err(format!("did not start listening on {addr}"))
                }
            })
            .await?;
        Ok(info.spec.addr)
    }

    /// Stops the replica's process (if any) and removes its directory.
    pub async fn delete_replica(&self, volume: &str, name: &str, disk: &str) -> Result<(), Error> {
        let dir = self.replica_dir(volume, name, disk)?;
        let _op = self.ops.lock().await;
        self.halt(&key(Kind::Replica, volume, name)).await?;
        match std::fs::remove_dir_all(&dir) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                return Err(os("removing", &dir)(e))
            }
            _ => {}
        }
        tracing::info!(volume.id = %volume, replica = %name, "replica deleted");
        Ok(())
    }

    /// Every instance this node runs, replicas then engines, by volume.
    pub fn list(&self) -> Vec<InstanceInfo> {
        self.live
            .lock()
            .expect("poisoned")
            .values()
            .map(Instance::info)
            .collect()
    }

    /// The node is shutting down. Processes it started itself are stopped:
    /// engines first, so each flushes to replicas that still run. The
    /// records stay, so the node starts them again when it comes back.
    /// Processes a launcher started are left running, adopted again when
    /// the node plugin is back: its container is being restarted (a
    /// liveness failure, a crash), and they are the launcher's to stop
    /// when the pod goes.
    pub async fn stop_all(&self) {
        let all = std::mem::take(&mut *self.live.lock().expect("poisoned"));
        if let Starter::Launcher(socket) = &self.starter {
            tracing::info!(instances = all.len(), launcher = %socket.display(), "leaving instances running in the launcher");
            futures_util::future::join_all(all.into_values().map(|i| i.proc.abandon())).await;
            return;
        }
        let (engines, replicas): (Vec<_>, Vec<_>) = all
            .into_values()
            .partition(|i| i.spec().kind == Kind::Engine);
        futures_util::future::join_all(engines.into_iter().map(|i| i.proc.stop())).await;
        futures_util::future::join_all(replicas.into_iter().map(|i| i.proc.stop())).await;
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
    ) -> Result<InstanceInfo, Error> {
        let path = self.engine_file(volume)?;
        let _op = self.ops.lock().await;
        if let Some(i) = self.get(&key(Kind::Engine, volume, "engine")) {
            if i.spec.size != size {
                return Err(Error::EngineMismatch {
                    volume: volume.to_owned(),
                    have: i.spec.size,
                    want: size,
                });
            }
            return Ok(i);
        }
        let fail = |cause: String| Error::Start {
            name: format!("engine of {volume}"),
            cause,
        };
        let want = self.frontend;
        let frontend = tokio::task::spawn_blocking(move || super::attach::choose(want))
            .await
            .map_err(|e| fail(e.to_string()))?
            .map_err(fail)?;
        let dir = crate::parent_dir(&path).expect("engine file has a directory");
        std::fs::create_dir_all(dir).map_err(os("creating", dir))?;
        let lo = IpAddr::from([127, 0, 0, 1]);
        let control =
            std::net::SocketAddr::new(lo, free_port(lo).map_err(|e| fail(e.to_string()))?)
                .to_string();
        let mut args = [
            "engine",
            "--volume",
            volume,
            "--size",
            &size.to_string(),
            "--control",
            &control,
            "--frontend",
            frontend.as_str(),
        ]
        .map(str::to_owned)
        .to_vec();
        match frontend {
            Frontend::Fuse => args.extend(["--path".to_owned(), path.display().to_string()]),
            // The initiator is on this node: the portal needs no other
            // address than loopback, and keeps its port across restarts
            // (it is in the record), so the initiator reconnects.
            Frontend::Iscsi => {
                let port = free_port(lo).map_err(|e| fail(e.to_string()))?;
                args.extend([
                    "--portal".to_owned(),
                    std::net::SocketAddr::new(lo, port).to_string(),
                ]);
            }
        }
        for r in replicas {
            args.extend(["--replica".to_owned(), r.clone()]);
        }
        let spec = Spec {
            kind: Kind::Engine,
            volume: volume.to_owned(),
            name: "engine".to_owned(),
            size,
            addr: control,
            path,
            args,
        };
        self.launch(spec, |control| async move {
            wait_engine(&control, Instant::now() + ENGINE_START).await
        })
        .await
    }

    /// Stops `volume`'s engine if it runs here.
    pub async fn stop_engine(&self, volume: &str) -> Result<(), Error> {
        self.engine_file(volume)?;
        let _op = self.ops.lock().await;
        self.halt(&key(Kind::Engine, volume, "engine")).await?;
        tracing::info!(volume.id = %volume, "engine stopped");
        Ok(())
    }

    /// A protocol client of replica `name` of `volume` here; failures are
    /// described as part of doing `what`.
    async fn replica_client(&self, volume: &str, name: &str, what: &str) -> Result<Client, Error> {
        let key = key(Kind::Replica, volume, name);
        let info = self.get(&key).ok_or_else(|| Error::NotHere(key.clone()))?;
        Client::connect(&info.spec.addr)
            .await
            .map_err(|e| replica_refused(what, &e))
    }

    /// Grows replica `name` of `volume` (no engine serving it) to `size`.
    pub async fn expand_replica(&self, volume: &str, name: &str, size: u64) -> Result<(), Error> {
        let key = key(Kind::Replica, volume, name);
        let _op = self.ops.lock().await;
        let what = format!("growing {key} to {size} bytes");
        let c = self.replica_client(volume, name, &what).await?;
        let r = c.expand(size).await.map_err(|e| replica_refused(&what, &e));
        c.shutdown();
        r?;
        self.update(&key, |s| s.size = size)?;
        tracing::info!(volume.id = %volume, replica = %name, size, "replica grown");
        Ok(())
    }

    /// Takes, marks removed or removes snapshot `snapshot` on resting
    /// replica `name` of `volume`; done already is success.
    pub async fn replica_snapshot(
        &self,
        volume: &str,
        name: &str,
        snapshot: &str,
        op: SnapshotOp,
    ) -> Result<(), Error> {
        let what = format!("{op} snapshot {snapshot} on replica {name} of {volume}");
        let c = self.replica_client(volume, name, &what).await?;
        let r = async {
            let present = c
                .list()
                .await?
                .iter()
                .any(|l| l.name == snapshot && !l.head);
            match (&op, present) {
                (SnapshotOp::Take(labels), false) => c.snapshot(snapshot, labels.clone()).await,
                (SnapshotOp::MarkRemoved, true) => c.mark_removed(snapshot).await,
                (SnapshotOp::Remove, true) => c.remove_snapshot(snapshot).await,
                _ => Ok(()),
            }
        }
        .await
        .map_err(|e| replica_refused(&what, &e));
        c.shutdown();
        r?;
        tracing::info!(volume.id = %volume, replica = %name, snapshot, op = %op, "replica snapshot");
        Ok(())
    }

    /// Fills resting replica `name` of `volume` with snapshot `snapshot`
    /// of the volume whose replicas serve at `sources` (see
    /// [`copy::restore`]); returns the bytes copied.
    pub async fn restore_replica(
        &self,
        volume: &str,
        name: &str,
        sources: &[String],
        snapshot: &str,
    ) -> Result<u64, Error> {
        let what = format!("restoring replica {name} of {volume} from {snapshot}");
        let target = self.replica_client(volume, name, &what).await?;
        let r = copy::restore(sources, &target, snapshot).await;
        target.shutdown();
        // Why a copy fails (no current source reachable, a source being
        // rebuilt, a connection lost) passes; the target stays flagged
        // rebuilding and a retry resumes it.
        let copied = r.map_err(|cause| Error::Refused {
            what: what.clone(),
            kind: crate::error::ErrorKind::Unavailable,
            cause,
        })?;
        tracing::info!(volume.id = %volume, replica = %name, snapshot, copied_bytes = copied, "replica restored");
        Ok(copied)
    }

    /// A control client of `volume`'s engine here; failures are described
    /// as part of doing `what`.
    async fn engine_client(
        &self,
        volume: &str,
        what: &str,
    ) -> Result<crate::engine::control::EngineClient<tonic::transport::Channel>, Error> {
        let key = key(Kind::Engine, volume, "engine");
        let info = self.get(&key).ok_or_else(|| Error::NotHere(key.clone()))?;
        let ch = tonic::transport::Endpoint::from_shared(format!("http://{}", info.spec.addr))
            .map_err(|e| Error::Refused {
                what: what.to_owned(),
                kind: crate::error::ErrorKind::InvalidArgument,
                cause: e.to_string(),
            })?
            .connect_timeout(Duration::from_secs(5))
            .timeout(Duration::from_secs(60))
            .connect()
            .await
            .map_err(|e| Error::Refused {
                what: what.to_owned(),
                kind: crate::error::ErrorKind::Unavailable,
                cause: e.to_string(),
            })?;
        Ok(crate::engine::control::EngineClient::new(ch))
    }

    /// The engine's own refusal of `what`.
    fn engine_refused(what: &str, e: &tonic::Status) -> Error {
        Error::Refused {
            what: what.to_owned(),
            kind: crate::error::ErrorKind::from_grpc(e.code())
                .unwrap_or(crate::error::ErrorKind::Io),
            cause: e.message().to_owned(),
        }
    }

    /// The status of `volume`'s engine here.
    pub async fn engine_status(
        &self,
        volume: &str,
    ) -> Result<crate::engine::control::pb::StatusResponse, Error> {
        let what = format!("asking the engine of {volume} for its status");
        self.engine_client(volume, &what)
            .await?
            .status(crate::engine::control::pb::StatusRequest {})
            .await
            .map(tonic::Response::into_inner)
            .map_err(|e| Self::engine_refused(&what, &e))
    }

    /// Adds replica `address` to `volume`'s engine here, which rebuilds it.
    pub async fn engine_add_replica(&self, volume: &str, address: &str) -> Result<(), Error> {
        let what = format!("adding replica {address} to the engine of {volume}");
        self.engine_client(volume, &what)
            .await?
            .add_replica(crate::engine::control::pb::ReplicaRequest {
                address: address.to_owned(),
            })
            .await
            .map_err(|e| Self::engine_refused(&what, &e))?;
        // A restarted engine must find every member of the volume's
        // latest epoch, this one included once it is rebuilt.
        self.engine_replicas(volume, |r| {
            if !r.iter().any(|a| a == address) {
                r.push(address.to_owned());
            }
        })
    }

    /// Changes the `--replica` list `volume`'s engine restarts with.
    fn engine_replicas(&self, volume: &str, f: impl FnOnce(&mut Vec<String>)) -> Result<(), Error> {
        let key = key(Kind::Engine, volume, "engine");
        self.update(&key, |s| {
            let mut replicas: Vec<String> = s
                .args
                .windows(2)
                .filter(|w| w[0] == "--replica")
                .map(|w| w[1].clone())
                .collect();
            f(&mut replicas);
            let mut args = without(&s.args, &["--replica"]);
            for r in replicas {
                args.extend(["--replica".to_owned(), r]);
            }
            s.args = args;
        })
    }

    /// Takes replica `address` out of `volume`'s engine here; one the
    /// engine does not know is out already.
    pub async fn engine_remove_replica(&self, volume: &str, address: &str) -> Result<(), Error> {
        let what = format!("removing replica {address} from the engine of {volume}");
        match self
            .engine_client(volume, &what)
            .await?
            .remove_replica(crate::engine::control::pb::ReplicaRequest {
                address: address.to_owned(),
            })
            .await
        {
            Err(e) if e.code() != tonic::Code::NotFound => {
                return Err(Self::engine_refused(&what, &e))
            }
            _ => {}
        }
        self.engine_replicas(volume, |r| r.retain(|a| a != address))
    }

    /// Grows `volume` online through its engine here to `size`; the engine
    /// restarts with the new size from then on.
    pub async fn expand_engine(&self, volume: &str, size: u64) -> Result<(), Error> {
        use crate::engine::control::pb;
        let key = key(Kind::Engine, volume, "engine");
        let _op = self.ops.lock().await;
        let what = format!("growing {volume} to {size} bytes");
        self.engine_client(volume, &what)
            .await?
            .expand(pb::ExpandRequest { size_bytes: size })
            .await
            .map_err(|e| Self::engine_refused(&what, &e))?;
        self.update(&key, |s| {
            s.size = size;
            if let Some(i) = s.args.iter().position(|a| a == "--size") {
                if let Some(v) = s.args.get_mut(i + 1) {
                    *v = size.to_string();
                }
            }
        })?;
        tracing::info!(volume.id = %volume, size, "volume grown online");
        Ok(())
    }

    /// Takes (or with `remove`, removes) snapshot `snapshot` through
    /// `volume`'s engine here; done already is success.
    pub async fn engine_snapshot(
        &self,
        volume: &str,
        snapshot: &str,
        remove: bool,
        labels: HashMap<String, String>,
    ) -> Result<(), Error> {
        use crate::engine::control::pb;
        let what = format!(
            "{} snapshot {snapshot} of {volume} through its engine",
            if remove { "removing" } else { "taking" }
        );
        let mut c = self.engine_client(volume, &what).await?;
        let present = c
            .list_snapshots(pb::ListSnapshotsRequest {})
            .await
            .map_err(|e| Self::engine_refused(&what, &e))?
            .into_inner()
            .snapshots
            .iter()
            .any(|l| l.name == snapshot && !l.head);
        let name = snapshot.to_owned();
        match (remove, present) {
            (false, false) => c
                .snapshot(pb::SnapshotRequest { name, labels })
                .await
                .map(drop),
            (true, true) => c
                .remove_snapshot(pb::SnapshotNameRequest { name })
                .await
                .map(drop),
            _ => Ok(()),
        }
        .map_err(|e| Self::engine_refused(&what, &e))?;
        tracing::info!(volume.id = %volume, snapshot, remove, "engine snapshot");
        Ok(())
    }

    /// The engine of `volume`, if this node runs one.
    pub fn engine(&self, volume: &str) -> Option<InstanceInfo> {
        self.get(&key(Kind::Engine, volume, "engine"))
    }
}

/// What [`Instances::replica_snapshot`] does with the snapshot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SnapshotOp {
    /// Take it, with these labels.
    Take(BTreeMap<String, String>),
    /// Mark it removed: the first step of removing it from every replica.
    MarkRemoved,
    /// Merge it away (marking it first if it is not yet).
    Remove,
}

impl std::fmt::Display for SnapshotOp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Take(_) => "taking",
            Self::MarkRemoved => "marking removed",
            Self::Remove => "removing",
        })
    }
}
