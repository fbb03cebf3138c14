//! How an engine's volume becomes a block device on this node, and stops
//! being one. Two ways, chosen once when the node starts ([`choose`]):
//!
//! - **iSCSI**, where the kernel has an initiator: the engine serves an
//!   iSCSI target on a loopback portal of its own, open-iscsi's `iscsiadm`
//!   discovers it (SendTargets) and logs in, and the kernel makes a SCSI
//!   disk, found under `/dev/disk/by-path`. An engine the instance manager
//!   restarts listens on the same portal, and the initiator reconnects by
//!   itself: the disk and the filesystem on it stay.
//! - **FUSE**, where it has none: a loop device over the engine's FUSE file
//!   ([`mount::attach_loop`]). An engine that dies leaves that loop device
//!   failing until the volume is staged again.
//!
//! Whether a volume is attached is read back from the kernel (sessions in
//! `/sys/class/iscsi_session`, loop devices' backing files), never stored,
//! so a call repeated after a crash of the node plugin finds what was done.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use super::mount::{self, Error};

/// The LUN the engine's iSCSI target serves the volume as.
pub const LUN: u32 = 1;

/// Present when the kernel's iSCSI initiator (its TCP transport) is loaded.
const ISCSI_TRANSPORT: &str = "/sys/class/iscsi_transport/tcp";
/// One directory per iSCSI session of the kernel's initiator.
const SESSIONS: &str = "/sys/class/iscsi_session";

/// How long a login may take to show its disk.
const DISK_WAIT: Duration = Duration::from_secs(30);
/// How long the disk may be there without its `/dev/disk/by-path` link
/// before it is used without one (a node without udev).
const UDEV_GRACE: Duration = Duration::from_secs(5);
/// How long a rescan may take to show the grown size.
const RESCAN_WAIT: Duration = Duration::from_secs(10);

/// How engines on this node serve their volumes to the kernel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Frontend {
    /// A FUSE file under a loop device.
    Fuse,
    /// An iSCSI target the node's initiator logs in to.
    Iscsi,
}

impl Frontend {
    /// Its name in publish contexts and on the command line.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Fuse => "fuse",
            Self::Iscsi => "iscsi",
        }
    }
}

/// Why this node cannot use the iSCSI initiator, or `None` when it can:
/// the kernel's `iscsi_tcp` transport is loaded (it is loaded here if it
/// is a module) and `iscsiadm` runs.
pub fn iscsi_unavailable() -> Option<String> {
    if !Path::new(ISCSI_TRANSPORT).exists() {
        let _ = Command::new("modprobe").arg("iscsi_tcp").output();
    }
    if !Path::new(ISCSI_TRANSPORT).exists() {
        return Some(
            "this kernel has no iSCSI initiator (iscsi_tcp is neither loaded nor loadable)".into(),
        );
    }
    match Command::new("iscsiadm").arg("--version").output() {
        Ok(_) => None,
        Err(e) => Some(format!("iscsiadm cannot be run ({e}); install open-iscsi")),
    }
}

/// iscsid's control socket, the abstract unix socket `iscsiadm` talks to
/// (and systemd's `iscsid.socket` listens on to start the daemon).
const ISCSID_SOCKET: &[u8] = b"ISCSIADM_ABSTRACT_NAMESPACE";

/// Whether something listens on [`ISCSID_SOCKET`] in this network
/// namespace: an initiator with no iscsid can discover nothing and log in
/// nowhere.
fn iscsid_listening(name: &[u8]) -> bool {
    use std::os::linux::net::SocketAddrExt;
    std::os::unix::net::SocketAddr::from_abstract_name(name)
        .and_then(|a| std::os::unix::net::UnixStream::connect_addr(&a))
        .is_ok()
}

/// The frontend this node serves volumes with: `want`, or where none is
/// asked for, iSCSI when the kernel can log in and iscsid answers, FUSE
/// otherwise.
pub fn choose(want: Option<Frontend>) -> Result<Frontend, String> {
    let unavailable = || {
        iscsi_unavailable().or_else(|| {
            (!iscsid_listening(ISCSID_SOCKET))
                .then(|| "iscsid is not running (nothing listens on its control socket)".to_owned())
        })
    };
    match want {
        Some(Frontend::Fuse) => Ok(Frontend::Fuse),
        // Asked for by name: iscsiadm may still start iscsid itself.
        Some(Frontend::Iscsi) => iscsi_unavailable().map_or(Ok(Frontend::Iscsi), Err),
        None => match unavailable() {
            None => Ok(Frontend::Iscsi),
            Some(why) => {
                tracing::info!(reason = %why, "serving volumes through FUSE and loop devices");
                Ok(Frontend::Fuse)
            }
        },
    }
}

/// Where an engine serves its volume on this node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Served {
    /// A regular file under FUSE.
    Fuse {
        /// The file.
        file: PathBuf,
    },
    /// LUN [`LUN`] of target `iqn` on `portal` (ip:port).
    Iscsi {
        /// The portal.
        portal: String,
        /// The target name.
        iqn: String,
    },
}

impl Served {
    /// The volume's block device on this node, attached now if it was not.
    pub fn attach(&self) -> Result<PathBuf, Error> {
        match self {
            Self::Fuse { file } => mount::attach_loop(file),
            Self::Iscsi { portal, iqn } => login(portal, iqn),
        }
    }

    /// The volume's block device, if it is attached.
    pub fn device(&self) -> Result<Option<PathBuf>, Error> {
        match self {
            Self::Fuse { file } => mount::loop_of(file),
            Self::Iscsi { iqn, .. } => Ok(disk_of(Path::new(SESSIONS), iqn)),
        }
    }

    /// Makes the attached device take the volume's new size, waiting for it
    /// to reach `want` bytes; its size after.
    pub fn refresh(&self, want: u64) -> Result<u64, Error> {
        match self {
            Self::Fuse { file } => mount::refresh_loop(file, want),
            Self::Iscsi { portal, iqn } => {
                let dev = disk_of(Path::new(SESSIONS), iqn).ok_or_else(|| not_attached(iqn))?;
                iscsiadm(&["-m", "node", "-T", iqn, "-p", portal, "--rescan"])?;
                let deadline = Instant::now() + RESCAN_WAIT;
                loop {
                    let size = mount::device_size(&dev)?;
                    if size >= want || Instant::now() >= deadline {
                        return Ok(size);
                    }
                    std::thread::sleep(Duration::from_millis(100));
                }
            }
        }
    }
}

/// Lets go of whatever device this node holds for a volume: the loop
/// device over its FUSE file `file` and its iSCSI session to `iqn`. The
/// filesystem on it must be unmounted first.
pub fn detach(file: &Path, iqn: &str) -> Result<(), Error> {
    mount::detach_loop(file)?;
    logout(iqn)
}

/// The block device this node holds for a volume, whichever way it is
/// attached: a loop device over its FUSE file `file`, or the disk of a
/// session to `iqn`.
pub fn attached(file: &Path, iqn: &str) -> Result<Option<PathBuf>, Error> {
    Ok(mount::loop_of(file)?.or_else(|| disk_of(Path::new(SESSIONS), iqn)))
}

fn not_attached(iqn: &str) -> Error {
    Error::Os {
        what: "finding the disk of iSCSI target",
        path: iqn.to_owned(),
        cause: std::io::Error::from(std::io::ErrorKind::NotFound),
    }
}

/// `/dev/disk/by-path` name udev gives LUN [`LUN`] of `iqn` on `portal`.
pub fn by_path(portal: &str, iqn: &str) -> PathBuf {
    PathBuf::from(format!(
        "/dev/disk/by-path/ip-{portal}-iscsi-{iqn}-lun-{LUN}"
    ))
}

/// The sessions (their sysfs directories under `sessions`) logged in to
/// target `iqn`.
fn sessions_of(sessions: &Path, iqn: &str) -> Vec<PathBuf> {
    let Ok(rd) = std::fs::read_dir(sessions) else {
        return Vec::new();
    };
    rd.flatten()
        .map(|e| e.path())
        .filter(|p| {
            std::fs::read_to_string(p.join("targetname")).is_ok_and(|t| t.trim_end() == iqn)
        })
        .collect()
}

/// The disk (`/dev/sdX`) the kernel made of LUN [`LUN`] in a session to
/// `iqn`: sysfs has it as
/// `<session>/device/target<H:C:T>/<H:C:T:L>/block/<name>`.
fn disk_of(sessions: &Path, iqn: &str) -> Option<PathBuf> {
    let suffix = format!(":{LUN}");
    for s in sessions_of(sessions, iqn) {
        let Ok(targets) = std::fs::read_dir(s.join("device")) else {
            continue;
        };
        for t in targets.flatten() {
            if !t.file_name().to_string_lossy().starts_with("target") {
                continue;
            }
            let Ok(luns) = std::fs::read_dir(t.path()) else {
                continue;
            };
            for l in luns.flatten() {
                if !l.file_name().to_string_lossy().ends_with(&suffix) {
                    continue;
                }
                let Ok(mut blocks) = std::fs::read_dir(l.path().join("block")) else {
                    continue;
                };
                if let Some(Ok(b)) = blocks.next() {
                    return Some(Path::new("/dev").join(b.file_name()));
                }
            }
        }
    }
    None
}

/// Runs `iscsiadm args`; its stdout on success.
fn iscsiadm(args: &[&str]) -> Result<String, Error> {
    mount::run("iscsiadm", args)
}

/// Logs in to `iqn` on `portal` unless a session is there already, and
/// waits for its disk.
fn login(portal: &str, iqn: &str) -> Result<PathBuf, Error> {
    let sessions = Path::new(SESSIONS);
    if sessions_of(sessions, iqn).is_empty() {
        let found = iscsiadm(&["-m", "discovery", "-t", "sendtargets", "-p", portal])?;
        if !offers(&found, iqn) {
            return Err(Error::Tool {
                cmd: format!("iscsiadm -m discovery -t sendtargets -p {portal}"),
                stderr: format!("the portal does not offer target {iqn}: {}", found.trim()),
            });
        }
        // A session that appeared meanwhile (a retry racing its own earlier
        // login) is as good as ours.
        if let Err(e) = iscsiadm(&["-m", "node", "-T", iqn, "-p", portal, "--login"]) {
            if sessions_of(sessions, iqn).is_empty() {
                return Err(e);
            }
        }
        tracing::info!(target = iqn, portal, "iSCSI session logged in");
    }
    wait_disk(portal, iqn)
}

/// Whether `iscsiadm -m discovery` output lists `iqn` (lines read
/// `ip:port,tpgt iqn`).
fn offers(discovery: &str, iqn: &str) -> bool {
    discovery
        .lines()
        .any(|l| l.split_whitespace().nth(1) == Some(iqn))
}

/// Waits for the disk of `iqn`: its `/dev/disk/by-path` link, resolved to
/// the device node (mountinfo names the device node), or the device node
/// found in sysfs when udev made no link within [`UDEV_GRACE`].
fn wait_disk(portal: &str, iqn: &str) -> Result<PathBuf, Error> {
    let link = by_path(portal, iqn);
    let start = Instant::now();
    loop {
        if let Ok(dev) = std::fs::canonicalize(&link) {
            return Ok(dev);
        }
        if let Some(dev) = disk_of(Path::new(SESSIONS), iqn) {
            if start.elapsed() >= UDEV_GRACE {
                tracing::warn!(target = iqn, device = %dev.display(), link = %link.display(), "no by-path link from udev; using the device node");
                return Ok(dev);
            }
        }
        if start.elapsed() >= DISK_WAIT {
            return Err(Error::Tool {
                cmd: format!("iscsiadm -m node -T {iqn} -p {portal} --login"),
                stderr: format!(
                    "logged in, but no disk for LUN {LUN} appeared within {DISK_WAIT:?}"
                ),
            });
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Logs out of every session to `iqn` and forgets its node record. Nothing
/// to do (and `iscsiadm` is not needed) when there is no session.
fn logout(iqn: &str) -> Result<(), Error> {
    let sessions = Path::new(SESSIONS);
    if sessions_of(sessions, iqn).is_empty() {
        return Ok(());
    }
    let out = iscsiadm(&["-m", "node", "-T", iqn, "--logout"]);
    if !sessions_of(sessions, iqn).is_empty() {
        out?;
        return Err(Error::Tool {
            cmd: format!("iscsiadm -m node -T {iqn} --logout"),
            stderr: "a session to the target is still logged in".into(),
        });
    }
    // The record only feeds later logins, which discover afresh.
    let _ = iscsiadm(&["-m", "node", "-T", iqn, "-o", "delete"]);
    tracing::info!(target = iqn, "iSCSI session logged out");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const IQN: &str = "iqn.2026-11.io.shorthorn:vol-a";

    /// Lays out sysfs the way the kernel does for a session whose LUN 0 is
    /// the target's controller and LUN 1 the volume.
    fn session(root: &Path, n: u32, iqn: &str, host: u32, disk: &str) {
        let s = root.join(format!("session{n}"));
        let t = s.join(format!("device/target{host}:0:0"));
        std::fs::create_dir_all(t.join(format!("{host}:0:0:0"))).unwrap();
        std::fs::create_dir_all(t.join(format!("{host}:0:0:1/block/{disk}"))).unwrap();
        std::fs::write(s.join("targetname"), format!("{iqn}\n")).unwrap();
    }

    #[test]
    fn the_disk_is_lun_1_of_a_session_to_the_target() {
        let d = tempfile::tempdir().unwrap();
        session(d.path(), 1, "iqn.2026-11.io.shorthorn:other", 2, "sda");
        assert_eq!(disk_of(d.path(), IQN), None);
        session(d.path(), 2, IQN, 3, "sdb");
        assert_eq!(disk_of(d.path(), IQN), Some(PathBuf::from("/dev/sdb")));
        assert_eq!(sessions_of(d.path(), IQN).len(), 1);
        assert!(sessions_of(&d.path().join("absent"), IQN).is_empty());
    }

    #[test]
    fn discovery_output_is_matched_by_the_whole_target_name() {
        let out = format!("127.0.0.1:3260,1 {IQN}\n127.0.0.1:3260,1 {IQN}-2\n");
        assert!(offers(&out, IQN));
        assert!(!offers(&out, "iqn.2026-11.io.shorthorn:vol"));
        assert!(!offers("", IQN));
    }

    #[test]
    fn iscsid_is_found_by_its_abstract_socket() {
        use std::os::linux::net::SocketAddrExt;
        // A name of this test's own: the real one may be served here.
        let name = format!("shorthorn-test-iscsid-{}", std::process::id());
        assert!(!iscsid_listening(name.as_bytes()));
        let addr = std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes()).unwrap();
        let l = std::os::unix::net::UnixListener::bind_addr(&addr).unwrap();
        assert!(iscsid_listening(name.as_bytes()));
        drop(l);
        assert!(!iscsid_listening(name.as_bytes()));
    }

    #[test]
    fn the_by_path_name_is_udevs() {
        assert_eq!(
            by_path("127.0.0.1:41000", IQN),
            PathBuf::from(
                "/dev/disk/by-path/ip-127.0.0.1:41000-iscsi-iqn.2026-11.io.shorthorn:vol-a-lun-1"
            )
        );
    }
}
