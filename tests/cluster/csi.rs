//! The CSI driver as real processes: one controller and nodes on their
//! own loopback addresses (127.0.0.2, .3, ...), each with its own disk
//! directory, driven through CSI clients generated from the same proto
//! over their unix sockets.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use shorthorn::api::manager as mapi;
use shorthorn::csi;
use shorthorn::csi::controller_client::ControllerClient;
use shorthorn::csi::node_client::NodeClient;
use tonic::transport::Channel;

use super::{free_addr, Proc};

/// One GiB.
pub const GIB: u64 = 1 << 30;

/// A controller process, its clients, and the nodes started for it.
pub struct Ctl {
    pub proc: Proc,
    pub csi: Channel,
    pub manager: mapi::manager_client::ManagerClient<Channel>,
    pub manager_addr: String,
    pub nodes: Vec<NodeProc>,
}

/// A node process with its own loopback address and disk.
pub struct NodeProc {
    pub proc: Proc,
    pub disk: PathBuf,
    /// Its `--state-dir`.
    pub state: PathBuf,
    /// Its CSI socket.
    pub sock: PathBuf,
    /// Its agent API, host:port.
    pub agent: String,
    /// Its command line, to start it again.
    pub args: Vec<String>,
    /// The `shorthorn launcher` it starts processes through, if any
    /// (stands for its own container of the node pod).
    pub launcher: Option<Proc>,
}

/// Every process's (pid, parent pid), from `/proc/*/stat`.
pub fn parents() -> Vec<(u32, u32)> {
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse().ok()) else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(e.path().join("stat")) else {
            continue;
        };
        // After the parenthesised name: state, then the parent's pid.
        let ppid = stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().nth(1))
            .and_then(|p| p.parse().ok());
        if let Some(ppid) = ppid {
            out.push((pid, ppid));
        }
    }
    out
}

fn spawn_node(args: &[String]) -> Proc {
    Proc(
        Command::new(env!("CARGO_BIN_EXE_shorthorn"))
            .args(args)
            .stdout(Stdio::null())
            .spawn()
            .unwrap(),
    )
}

impl NodeProc {
    /// SIGKILLs the node plugin (its instances keep running) and starts it
    /// again with the same command line.
    pub fn kill_and_restart(&mut self) {
        self.proc.0.kill().unwrap();
        self.proc.0.wait().unwrap();
        self.proc = spawn_node(&self.args);
    }

    /// SIGKILLs the node plugin with every process descended from it, as a
    /// container runtime kills a restarted container's processes, and
    /// starts it again.
    pub fn kill_container_and_restart(&mut self) {
        let root = self.proc.0.id();
        let mut doomed = vec![root];
        // Parents before children in one pass would miss grandchildren
        // listed first, so repeat until nothing new turns up.
        loop {
            let before = doomed.len();
            for (pid, ppid) in parents() {
                if doomed.contains(&ppid) && !doomed.contains(&pid) {
                    doomed.push(pid);
                }
            }
            if doomed.len() == before {
                break;
            }
        }
        for pid in &doomed {
            let pid = nix::unistd::Pid::from_raw(i32::try_from(*pid).unwrap());
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL);
        }
        self.proc.0.wait().unwrap();
        self.proc = spawn_node(&self.args);
    }

    /// Stops the node plugin with SIGTERM, as a container restart begins,
    /// waits until it has exited, and starts it again.
    pub fn term_and_restart(&mut self) {
        terminate(&mut self.proc);
        assert!(self.exited(), "node plugin still running after SIGTERM");
        self.proc = spawn_node(&self.args);
    }

    /// SIGKILLs the node plugin and every replica process on its disk, as
    /// a node that loses power would stop (its engines are left alone).
    pub fn kill_with_replicas(&mut self) {
        self.proc.0.kill().unwrap();
        self.proc.0.wait().unwrap();
        let pattern = format!("{}/replicas/", self.disk.display());
        Command::new("pkill")
            .args(["-KILL", "-f", &pattern])
            .status()
            .unwrap();
    }

    /// Starts the node plugin again with its command line.
    pub fn restart(&mut self) {
        self.proc = spawn_node(&self.args);
    }

    /// SIGKILLs the node plugin (its instances keep running) and starts it
    /// again with `SHORTHORN_FAILPOINT=failpoint` (a build with the
    /// `failpoints` feature aborts there).
    pub fn restart_armed(&mut self, failpoint: &str) {
        self.proc.0.kill().unwrap();
        self.proc.0.wait().unwrap();
        self.proc = Proc(
            Command::new(env!("CARGO_BIN_EXE_shorthorn"))
                .args(&self.args)
                .env("SHORTHORN_FAILPOINT", failpoint)
                .stdout(Stdio::null())
                .spawn()
                .unwrap(),
        );
    }

    /// Whether the node plugin process has exited.
    pub fn exited(&mut self) -> bool {
        matches!(self.proc.0.try_wait(), Ok(Some(_)))
    }

    /// A client of its agent API (waits for it to answer).
    pub async fn agent(&self) -> shorthorn::api::agent::agent_client::AgentClient<Channel> {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let ep = Channel::from_shared(format!("http://{}", self.agent)).unwrap();
            match ep.connect().await {
                Ok(c) => return shorthorn::api::agent::agent_client::AgentClient::new(c),
                Err(_) if Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                Err(e) => panic!("agent {} never answered: {e}", self.agent),
            }
        }
    }
}

/// SIGTERM, then wait up to 25 s for the process to exit.
fn terminate(p: &mut Proc) {
    super::signal(&p.0, nix::sys::signal::Signal::SIGTERM);
    let deadline = Instant::now() + Duration::from_secs(25);
    while Instant::now() < deadline {
        if let Ok(Some(_)) = p.0.try_wait() {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

impl Drop for NodeProc {
    /// SIGTERM, so the node stops its replica processes before it exits
    /// (a SIGKILLed node leaves them running, by design: see the node's
    /// module docs).
    fn drop(&mut self) {
        terminate(&mut self.proc);
        // A node with a launcher leaves its instances to it; stopping the
        // launcher stops them.
        if let Some(l) = &mut self.launcher {
            terminate(l);
        }
    }
}

fn start(dir: &Path) -> (Proc, PathBuf, String) {
    let sock = dir.join("csi.sock");
    let listen = free_addr();
    let child = Command::new(env!("CARGO_BIN_EXE_shorthorn"))
        .args(["controller", "--csi-endpoint"])
        .arg(format!("unix://{}", sock.display()))
        .args([
            "--listen",
            &listen,
            "--health-interval-secs",
            "1",
            "--data-dir",
        ])
        .arg(dir.join("state"))
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    (Proc(child), sock, listen)
}

/// A gRPC channel over the unix socket `sock`, as kubelet and the CSI
/// sidecars connect; waits up to 20 s for the socket to answer.
pub async fn uds_channel(sock: &Path) -> Channel {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        match csi::connect_unix(sock).await {
            Ok(c) => return c,
            Err(_) if Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(e) => panic!("socket {} never answered: {e}", sock.display()),
        }
    }
}

/// Starts a controller with its state under `dir` and connects to it.
pub async fn connect(dir: &Path) -> Ctl {
    let (proc, sock, listen) = start(dir);
    let deadline = Instant::now() + Duration::from_secs(20);
    let csi = uds_channel(&sock).await;
    let manager = loop {
        let ep = Channel::from_shared(format!("http://{listen}")).unwrap();
        match ep.connect().await {
            Ok(c) => break mapi::manager_client::ManagerClient::new(c),
            Err(_) if Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(e) => panic!("manager API never answered: {e}"),
        }
    };
    Ctl {
        proc,
        csi,
        manager,
        manager_addr: listen,
        nodes: Vec::new(),
    }
}

impl Ctl {
    pub fn controller(&self) -> ControllerClient<Channel> {
        ControllerClient::new(self.csi.clone())
    }

    /// Starts node `i` (address 127.0.0.(i+2), zone `zone`, one disk
    /// capped at `disk_gib`) and waits until the controller knows it.
    pub async fn add_node(&mut self, root: &Path, i: usize, zone: &str, disk_gib: u64) {
        self.add_node_with(root, i, zone, disk_gib, &[]).await;
    }

    /// [`Self::add_node`] with `extra` arguments for `shorthorn node`.
    pub async fn add_node_with(
        &mut self,
        root: &Path,
        i: usize,
        zone: &str,
        disk_gib: u64,
        extra: &[&str],
    ) {
        let disk = root.join(format!("node-{i}-disk"));
        let state = root.join(format!("node-{i}-state"));
        let sock = root.join(format!("node-{i}.sock"));
        std::fs::create_dir_all(&disk).unwrap();
        // Tests run side by side, each with nodes on 127.0.0.2-4, so a port
        // free a moment ago can be taken by the time the node binds it:
        // a node that exits before registering is started again on
        // another port.
        let deadline = Instant::now() + Duration::from_secs(20);
        for attempt in 0.. {
            let ip = format!("127.0.0.{}", i + 2);
            let port = std::net::TcpListener::bind((ip.as_str(), 0))
                .unwrap()
                .local_addr()
                .unwrap()
                .port();
            let agent = format!("{ip}:{port}");
            let mut args: Vec<String> =
                ["node", "--node-id", &format!("node-{i}"), "--csi-endpoint"]
                    .map(str::to_owned)
                    .to_vec();
            args.push(format!("unix://{}", sock.display()));
            args.extend(["--state-dir".to_owned(), state.display().to_string()]);
            args.extend(["--agent-listen".to_owned(), agent.clone()]);
            args.extend(
                ["--controller", &self.manager_addr, "--zone", zone, "--disk"].map(str::to_owned),
            );
            args.push(format!("{}:ssd={disk_gib}Gi", disk.display()));
            args.extend(extra.iter().map(|s| (*s).to_owned()));
            let mut proc = spawn_node(&args);
            loop {
                let registered = self
                    .manager
                    .list_nodes(mapi::ListNodesRequest {})
                    .await
                    .unwrap()
                    .into_inner()
                    .nodes_json
                    .iter()
                    .any(|n| n.contains(&format!("\"node-{i}\"")));
                if registered {
                    self.nodes.push(NodeProc {
                        proc,
                        disk,
                        state,
                        sock,
                        agent,
                        args,
                        launcher: None,
                    });
                    return;
                }
                if let Ok(Some(st)) = proc.0.try_wait() {
                    assert!(attempt < 3, "node-{i} keeps exiting ({st})");
                    break;
                }
                assert!(Instant::now() < deadline, "node-{i} never registered");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }

    /// [`Self::add_node`] whose replicas and engines are started by a
    /// `shorthorn launcher` process of its own, not by the node plugin.
    pub async fn add_node_launched(&mut self, root: &Path, i: usize, zone: &str, disk_gib: u64) {
        let sock = root.join(format!("node-{i}-launcher.sock"));
        let launcher = Proc(
            Command::new(env!("CARGO_BIN_EXE_shorthorn"))
                .args(["launcher", "--socket"])
                .arg(&sock)
                .stdout(Stdio::null())
                .spawn()
                .unwrap(),
        );
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::os::unix::net::UnixStream::connect(&sock).is_err() {
            assert!(Instant::now() < deadline, "the launcher never listened");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let sock = sock.display().to_string();
        self.add_node_with(root, i, zone, disk_gib, &["--launcher", &sock])
            .await;
        self.nodes.last_mut().unwrap().launcher = Some(launcher);
    }

    /// Three nodes in zones z1..z3 with `disk_gib` GiB disks.
    pub async fn add_three(&mut self, root: &Path, disk_gib: u64) {
        for (i, z) in ["z1", "z2", "z3"].iter().enumerate() {
            self.add_node(root, i, z, disk_gib).await;
        }
    }

    /// A CSI Node client of node `i`.
    pub async fn node(&self, i: usize) -> NodeClient<Channel> {
        NodeClient::new(uds_channel(&self.nodes[i].sock).await)
    }

    /// Replica directories of volume `id` on every node's disk.
    pub fn replica_dirs(&self, id: &str) -> Vec<PathBuf> {
        let mut v = Vec::new();
        for n in &self.nodes {
            if let Ok(rd) = std::fs::read_dir(n.disk.join("replicas")) {
                for e in rd {
                    let p = e.unwrap().path();
                    let name = p.file_name().unwrap().to_string_lossy().into_owned();
                    if name.starts_with(&format!("{id}-r")) {
                        v.push(p);
                    }
                }
            }
        }
        v
    }

    pub async fn record(&mut self, id: &str) -> serde_json::Value {
        let v = self
            .manager
            .get_volume(mapi::GetVolumeRequest {
                volume_id: id.into(),
            })
            .await
            .unwrap()
            .into_inner();
        serde_json::from_str(&v.volume_json).unwrap()
    }
}

pub fn mount_cap(mode: csi::volume_capability::access_mode::Mode) -> csi::VolumeCapability {
    csi::VolumeCapability {
        access_type: Some(csi::volume_capability::AccessType::Mount(
            csi::volume_capability::MountVolume {
                fs_type: "ext4".into(),
                mount_flags: vec![],
                volume_mount_group: String::new(),
            },
        )),
        access_mode: Some(csi::volume_capability::AccessMode { mode: mode as i32 }),
    }
}

pub fn rwo() -> csi::VolumeCapability {
    mount_cap(csi::volume_capability::access_mode::Mode::SingleNodeWriter)
}

pub fn create_req(name: &str, bytes: i64, params: &[(&str, &str)]) -> csi::CreateVolumeRequest {
    csi::CreateVolumeRequest {
        name: name.into(),
        capacity_range: Some(csi::CapacityRange {
            required_bytes: bytes,
            limit_bytes: 0,
        }),
        volume_capabilities: vec![rwo()],
        parameters: params
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect(),
        ..Default::default()
    }
}

pub async fn count_volumes(c: &Ctl) -> usize {
    c.controller()
        .list_volumes(csi::ListVolumesRequest::default())
        .await
        .unwrap()
        .into_inner()
        .entries
        .len()
}
