//! What NodeStage and NodePublish do to the kernel: loop devices over an
//! engine's FUSE file, probing a device for a filesystem, making one, and
//! mounts (filesystem, bind, read-only). Each step first looks at the
//! kernel's current state (`/proc/self/mountinfo`, `/sys/block/loop*`) so
//! a retry after a crash half-way finds what was already done instead of
//! doing it twice.
//!
//! The real tools do the work (`losetup`, `blkid`, `mkfs.*`, `mount`,
//! `umount`), as on any Linux node; their stderr is carried into the
//! error so the operator sees the tool's own words.

use std::path::{Path, PathBuf};
use std::process::Command;

/// What attaching, formatting or mounting can fail at.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A tool ran and failed.
    #[error("{cmd} failed: {stderr}")]
    Tool {
        /// The command line.
        cmd: String,
        /// What it said.
        stderr: String,
    },
    /// A tool could not be run at all.
    #[error("cannot run {cmd}: {cause} (is it installed?)")]
    Missing {
        /// The program.
        cmd: String,
        /// Why.
        cause: std::io::Error,
    },
    /// The device holds something else than the filesystem asked for;
    /// making a filesystem would destroy it.
    #[error("{device} holds {found}, not {want}; refusing to format it")]
    Occupied {
        /// The device.
        device: String,
        /// What blkid found there.
        found: String,
        /// The filesystem asked for.
        want: String,
    },
    /// A path is mounted from something else.
    #[error("{path} is mounted from {found}, not {want}")]
    Mismatch {
        /// The mount point.
        path: String,
        /// What is mounted there.
        found: String,
        /// What should be.
        want: String,
    },
    /// The kernel refuses to grow a mounted ext4 here: online resizing
    /// needs CAP_SYS_RESOURCE, which this node plugin lacks.
    #[error("growing the mounted ext4 on {device} needs CAP_SYS_RESOURCE, which this node plugin lacks; it grows the next time the volume is staged (or give the plugin that capability)")]
    NoOnlineGrow {
        /// The device.
        device: String,
    },
    /// The volume's access mode allows one publication, and it has one.
    #[error("volume {volume} has access mode SINGLE_NODE_SINGLE_WRITER and is already published at {other}; unpublish it there first")]
    SingleWriter {
        /// The volume.
        volume: String,
        /// Where it is published.
        other: String,
    },
    /// A file or directory operation failed.
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
    /// The kind the CSI boundary maps to a gRPC code.
    pub fn kind(&self) -> crate::error::ErrorKind {
        use crate::error::ErrorKind as K;
        match self {
            Self::Occupied { .. } | Self::NoOnlineGrow { .. } | Self::SingleWriter { .. } => {
                K::FailedPrecondition
            }
            Self::Mismatch { .. } => K::AlreadyExists,
            Self::Tool { .. } | Self::Missing { .. } | Self::Os { .. } => K::Io,
        }
    }
}

fn os(what: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> Error {
    let path = path.display().to_string();
    move |cause| Error::Os { what, path, cause }
}

/// Runs `prog args`; its stdout on success.
pub(super) fn run(prog: &str, args: &[&str]) -> Result<String, Error> {
    let out = Command::new(prog)
        .args(args)
        .output()
        .map_err(|cause| Error::Missing {
            cmd: prog.to_owned(),
            cause,
        })?;
    if !out.status.success() {
        return Err(Error::Tool {
            cmd: format!("{prog} {}", args.join(" ")),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// One line of `/proc/self/mountinfo`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MountEntry {
    /// `major:minor` of the mounted device.
    pub dev: String,
    /// The directory or file of that filesystem mounted here (`/` for a
    /// whole filesystem, `/loop3` for a bind of a device node).
    pub root: PathBuf,
    /// The mount point.
    pub target: PathBuf,
    /// Per-mount options (`rw`/`ro`, ...).
    pub options: Vec<String>,
    /// The filesystem type.
    pub fstype: String,
    /// The mount source (a device path for block filesystems).
    pub source: String,
}

impl MountEntry {
    /// Whether this mount is read-only.
    pub fn read_only(&self) -> bool {
        self.options.iter().any(|o| o == "ro")
    }
}

/// Undoes mountinfo's octal escapes (`\040` for a space, ...).
fn unescape(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 3 < b.len()
            && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c))
        {
            let v = b[i + 1..i + 4]
                .iter()
                .fold(0u32, |acc, c| acc * 8 + u32::from(c - b'0'));
            out.push(u8::try_from(v).unwrap_or(b'?'));
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Parses the text of `/proc/<pid>/mountinfo` (see proc(5)); lines that do
/// not have its shape are skipped.
pub fn parse_mountinfo(text: &str) -> Vec<MountEntry> {
    text.lines()
        .filter_map(|line| {
            let (head, tail) = line.split_once(" - ")?;
            let h: Vec<&str> = head.split(' ').collect();
            let t: Vec<&str> = tail.split(' ').collect();
            if h.len() < 6 || t.len() < 2 {
                return None;
            }
            Some(MountEntry {
                dev: h[2].to_owned(),
                root: PathBuf::from(unescape(h[3])),
                target: PathBuf::from(unescape(h[4])),
                options: h[5].split(',').map(str::to_owned).collect(),
                fstype: unescape(t[0]),
                source: unescape(t[1]),
            })
        })
        .collect()
}

/// The mount at exactly `path` (the last one, which is what a lookup of
/// the path sees), if any.
pub fn mounted_at(path: &Path) -> Result<Option<MountEntry>, Error> {
    let me = Path::new("/proc/self/mountinfo");
    let text = std::fs::read_to_string(me).map_err(os("reading", me))?;
    Ok(parse_mountinfo(&text)
        .into_iter()
        .rev()
        .find(|m| m.target == path))
}

/// Where else the mount at `mounted` shows the same filesystem or file
/// (same device, same root), besides the targets in `except`.
pub fn also_mounted(mounted: &MountEntry, except: &[&Path]) -> Result<Vec<PathBuf>, Error> {
    let me = Path::new("/proc/self/mountinfo");
    let text = std::fs::read_to_string(me).map_err(os("reading", me))?;
    Ok(parse_mountinfo(&text)
        .into_iter()
        .filter(|m| m.dev == mounted.dev && m.root == mounted.root)
        .filter(|m| m.target != mounted.target && !except.contains(&m.target.as_path()))
        .map(|m| m.target)
        .collect())
}

/// The loop device whose backing file is `file`, if one is attached.
pub fn loop_of(file: &Path) -> Result<Option<PathBuf>, Error> {
    let sys = Path::new("/sys/block");
    let rd = std::fs::read_dir(sys).map_err(os("listing", sys))?;
    for e in rd.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if !name.starts_with("loop") {
            continue;
        }
        let Ok(backing) = std::fs::read_to_string(e.path().join("loop/backing_file")) else {
            continue;
        };
        // A lazily detached FUSE file shows with a " (deleted)" suffix; that
        // device is dead and not ours to reuse.
        if Path::new(backing.trim_end_matches('\n')) == file {
            return Ok(Some(PathBuf::from("/dev").join(name)));
        }
    }
    Ok(None)
}

/// Attaches a loop device over `file` with direct I/O (no second page
/// cache above the engine), or finds the one attached already.
pub fn attach_loop(file: &Path) -> Result<PathBuf, Error> {
    if let Some(d) = loop_of(file)? {
        return Ok(d);
    }
    let f = file.to_string_lossy();
    let dev = run("losetup", &["--find", "--show", "--direct-io=on", &f])?;
    Ok(PathBuf::from(dev.trim()))
}

/// Detaches the loop device over `file`, if any.
pub fn detach_loop(file: &Path) -> Result<(), Error> {
    if let Some(d) = loop_of(file)? {
        run("losetup", &["--detach", &d.to_string_lossy()])?;
    }
    Ok(())
}

/// What a device holds, by its on-disk signatures: `None` when blkid finds
/// none (a blank device), else the filesystem or partition-table type.
pub fn probe(device: &Path) -> Result<Option<String>, Error> {
    let d = device.to_string_lossy();
    let out = Command::new("blkid")
        .args(["-p", "-o", "export", &d])
        .output()
        .map_err(|cause| Error::Missing {
            cmd: "blkid".into(),
            cause,
        })?;
    // blkid exits 2 when it finds no signature at all.
    if out.status.code() == Some(2) {
        return Ok(None);
    }
    if !out.status.success() {
        return Err(Error::Tool {
            cmd: format!("blkid -p -o export {d}"),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        });
    }
    let text = String::from_utf8_lossy(&out.stdout);
    let field = |k: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(k).map(str::to_owned))
    };
    Ok(Some(
        field("TYPE=")
            .or_else(|| field("PTTYPE=").map(|t| format!("a {t} partition table")))
            .unwrap_or_else(|| "an unknown signature".to_owned()),
    ))
}

/// Makes filesystem `fs` on `device` if it is blank; leaves a device that
/// already holds `fs` alone; refuses anything else.
pub fn format_if_blank(device: &Path, fs: &str) -> Result<bool, Error> {
    match probe(device)? {
        Some(found) if found == fs => Ok(false),
        Some(found) => Err(Error::Occupied {
            device: device.display().to_string(),
            found,
            want: fs.to_owned(),
        }),
        None => {
            let d = device.to_string_lossy();
            // A new volume reads as zeros already: skip the discard pass.
            match fs {
                "xfs" => run("mkfs.xfs", &["-q", "-K", &d])?,
                _ => run("mkfs.ext4", &["-q", "-F", "-E", "nodiscard", &d])?,
            };
            tracing::info!(device = %d, fs, "filesystem made");
            Ok(true)
        }
    }
}

/// Mounts `device` (filesystem `fs`) at `target` with `flags`, unless it
/// is mounted there already.
pub fn mount_fs(device: &Path, fs: &str, target: &Path, flags: &[String]) -> Result<(), Error> {
    if let Some(m) = mounted_at(target)? {
        if Path::new(&m.source) == device {
            return Ok(());
        }
        return Err(Error::Mismatch {
            path: target.display().to_string(),
            found: m.source,
            want: device.display().to_string(),
        });
    }
    std::fs::create_dir_all(target).map_err(os("creating", target))?;
    let (d, t) = (device.to_string_lossy(), target.to_string_lossy());
    let mut args = vec!["-t", fs];
    let opts = flags.join(",");
    if !opts.is_empty() {
        args.extend(["-o", &opts]);
    }
    args.extend([&*d, &*t]);
    run("mount", &args)?;
    Ok(())
}

/// Bind-mounts `source` (a directory or a device node) at `target`,
/// read-only when asked; creates `target` (a directory, or a file for a
/// device) first.
pub fn bind(source: &Path, target: &Path, read_only: bool, flags: &[String]) -> Result<(), Error> {
    if let Some(m) = mounted_at(target)? {
        if m.read_only() == read_only {
            return Ok(());
        }
        return Err(Error::Mismatch {
            path: target.display().to_string(),
            found: format!(
                "a {} mount",
                if m.read_only() {
                    "read-only"
                } else {
                    "writable"
                }
            ),
            want: format!("a {} one", if read_only { "read-only" } else { "writable" }),
        });
    }
    let is_dir = std::fs::metadata(source)
        .map_err(os("reading", source))?
        .is_dir();
    if is_dir {
        std::fs::create_dir_all(target).map_err(os("creating", target))?;
    } else {
        if let Some(p) = crate::parent_dir(target) {
            std::fs::create_dir_all(p).map_err(os("creating", p))?;
        }
        std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(target)
            .map_err(os("creating", target))?;
    }
    let (s, t) = (source.to_string_lossy(), target.to_string_lossy());
    run("mount", &["--bind", &s, &t])?;
    let mut opts = vec!["remount", "bind"];
    if read_only {
        opts.push("ro");
    }
    opts.extend(flags.iter().map(String::as_str));
    if opts.len() > 2 {
        // A bind mount takes per-mount flags only through a remount.
        if let Err(e) = run("mount", &["-o", &opts.join(","), &t]) {
            let _ = run("umount", &[&t]);
            return Err(e);
        }
    }
    Ok(())
}

/// Makes the loop device over `file` take the file's current size, once
/// the file shows at least `want` bytes (the FUSE file's size reaches the
/// kernel when its cached attributes expire, within a second or two).
pub fn refresh_loop(file: &Path, want: u64) -> Result<u64, Error> {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    loop {
        let len = std::fs::metadata(file).map_err(os("reading", file))?.len();
        if len >= want || std::time::Instant::now() >= deadline {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
    let dev = loop_of(file)?.ok_or_else(|| Error::Os {
        what: "finding the loop device over",
        path: file.display().to_string(),
        cause: std::io::Error::from(std::io::ErrorKind::NotFound),
    })?;
    run("losetup", &["--set-capacity", &dev.to_string_lossy()])?;
    device_size(&dev)
}

/// The size of block device `dev` in bytes.
pub fn device_size(dev: &Path) -> Result<u64, Error> {
    use std::io::Seek;
    std::fs::File::open(dev)
        .and_then(|mut f| f.seek(std::io::SeekFrom::End(0)))
        .map_err(os("sizing", dev))
}

/// Grows the filesystem mounted at `mountpoint` (on `dev`) to fill the
/// device, online.
pub fn grow_fs(dev: &Path, mountpoint: &Path) -> Result<(), Error> {
    let m = mounted_at(mountpoint)?.ok_or_else(|| Error::Os {
        what: "finding the filesystem mounted at",
        path: mountpoint.display().to_string(),
        cause: std::io::Error::from(std::io::ErrorKind::NotFound),
    })?;
    match m.fstype.as_str() {
        "xfs" => run("xfs_growfs", &[&mountpoint.to_string_lossy()])?,
        _ => match run("resize2fs", &[&dev.to_string_lossy()]) {
            Err(Error::Tool { stderr, .. }) if stderr.contains("Permission denied") => {
                return Err(Error::NoOnlineGrow {
                    device: dev.display().to_string(),
                })
            }
            r => r?,
        },
    };
    tracing::info!(device = %dev.display(), fs = %m.fstype, "filesystem grown");
    Ok(())
}

/// Grows an unmounted ext4 on `device` to fill it, if the device grew
/// since the filesystem was made or last grown (offline growth needs no
/// special capability, and `resize2fs` wants a checked filesystem first).
pub fn grow_ext4_offline(device: &Path) -> Result<(), Error> {
    let d = device.to_string_lossy();
    let head = run("dumpe2fs", &["-h", &d])?;
    let field = |k: &str| {
        head.lines()
            .find_map(|l| l.strip_prefix(k))
            .and_then(|v| v.trim().parse::<u64>().ok())
    };
    let (Some(blocks), Some(bsize)) = (field("Block count:"), field("Block size:")) else {
        return Ok(());
    };
    // Less than a MiB of slack is not worth a check and a resize.
    if device_size(device)? < blocks * bsize + (1 << 20) {
        return Ok(());
    }
    let fsck = Command::new("e2fsck")
        .args(["-f", "-p", &d])
        .output()
        .map_err(|cause| Error::Missing {
            cmd: "e2fsck".into(),
            cause,
        })?;
    // 0: clean; 1: errors corrected. Anything else is for a human.
    if !matches!(fsck.status.code(), Some(0 | 1)) {
        return Err(Error::Tool {
            cmd: format!("e2fsck -f -p {d}"),
            stderr: String::from_utf8_lossy(&fsck.stdout).trim().to_owned(),
        });
    }
    run("resize2fs", &[&d])?;
    tracing::info!(device = %d, "ext4 grown before mounting");
    Ok(())
}

/// Unmounts whatever is mounted at `target` (repeatedly, in case it was
/// mounted twice) and removes the mount point.
pub fn unmount_and_remove(target: &Path) -> Result<(), Error> {
    unmount(target)?;
    match std::fs::metadata(target) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Ok(m) if m.is_dir() => std::fs::remove_dir(target).map_err(os("removing", target)),
        Ok(_) => std::fs::remove_file(target).map_err(os("removing", target)),
        Err(cause) => Err(Error::Os {
            what: "reading",
            path: target.display().to_string(),
            cause,
        }),
    }
}

/// Unmounts every mount stacked at `target`.
pub fn unmount(target: &Path) -> Result<(), Error> {
    while mounted_at(target)?.is_some() {
        run("umount", &[&target.to_string_lossy()])?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mountinfo_lines_parse_with_escapes_and_optional_fields() {
        let text = "\
22 1 259:2 / / rw,relatime shared:1 - ext4 /dev/nvme0n1p2 rw
95 22 7:3 / /var/lib/kubelet/plugins/staging\\040dir rw,noatime shared:50 master:2 - xfs /dev/loop3 rw,attr2
96 22 7:3 / /pods/a/volume ro,noatime - xfs /dev/loop3 rw
bad line
";
        let m = parse_mountinfo(text);
        assert_eq!(m.len(), 3);
        assert_eq!(
            m[1].target,
            Path::new("/var/lib/kubelet/plugins/staging dir")
        );
        assert_eq!(
            (m[1].fstype.as_str(), m[1].source.as_str()),
            ("xfs", "/dev/loop3")
        );
        assert_eq!(m[1].dev, "7:3");
        assert!(!m[1].read_only());
        assert!(m[2].read_only());
    }

    #[test]
    fn unescape_leaves_plain_backslashes_alone() {
        assert_eq!(unescape("a\\134b"), "a\\b");
        assert_eq!(unescape("tab\\011"), "tab\t");
        assert_eq!(unescape("end\\"), "end\\");
        assert_eq!(unescape("short\\04"), "short\\04");
    }
}
