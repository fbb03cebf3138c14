//! The FUSE block file: the volume served as one regular file, mounted over
//! the path the node asked for, which the node turns into a block device
//! with a loop device (`losetup --direct-io=on`).
//!
//! What the kernel sends and what it becomes:
//! - `READ`/`WRITE` at any byte range → [`Volume::read_bytes`] /
//!   [`Volume::write_bytes`]. A write is answered only after every
//!   read-write replica stored it, so the FUSE file is write-through: no
//!   writeback cache, nothing acknowledged lives only in this process.
//!   Requests run concurrently on the engine's runtime; the kernel's
//!   `max_background` bounds how many are in flight.
//! - `FSYNC` (fsync, `O_SYNC`, the loop device's flush) and `FLUSH` (close)
//!   → [`Volume::flush`]: the answer means every acknowledged write is
//!   durable on every replica.
//! - `FALLOCATE` with `PUNCH_HOLE|KEEP_SIZE` (the loop device's discard,
//!   `fstrim`, mkfs) or `ZERO_RANGE` (the loop device's write-zeroes) →
//!   [`Volume::unmap_bytes`]: the range reads back as zeros and the
//!   replicas free the space. Preallocation is refused with `EOPNOTSUPP`:
//!   a thin volume cannot promise space.
//! - The size is the volume's, read on every `GETATTR` (attributes live one
//!   second in the kernel), so an online expansion shows within a second;
//!   truncating to another size is refused with `EPERM`.
//!
//! `O_DIRECT` needs nothing of ours: the kernel passes direct I/O straight
//! through as the same requests, and `FUSE_ASYNC_DIO` lets one direct
//! request be split and served in parallel.
//!
//! Mount and unmount: a path left mounted by an engine that was killed
//! ("transport endpoint is not connected") is detached before mounting; a
//! path a live engine serves is refused. [`FuseFile::stop`] unmounts; when a
//! loop device still holds the file it detaches lazily, and I/O through that
//! loop device fails once this process exits (never hangs).

use std::ffi::OsStr;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use fuser::{
    Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, INodeNo, InitFlags,
    KernelConfig, LockOwner, MountOption, OpenFlags, ReplyAttr, ReplyData, ReplyEmpty, ReplyOpen,
    ReplyWrite, ReplyXattr, Request, WriteFlags,
};
use tokio::runtime::Handle;

use super::Error;
use crate::engine::volume::request_pieces;
use crate::engine::{self, Volume};
use crate::error::ErrorKind;

/// How long the kernel may cache the file's attributes (its size).
const ATTR_TTL: Duration = Duration::from_secs(1);
/// The largest request the kernel sends; well under the engine's limit.
const MAX_WRITE: u32 = 1 << 20;
/// Requests the kernel keeps in flight at once (the queue depth).
const MAX_BACKGROUND: u16 = 64;

const FALLOC_FL_KEEP_SIZE: i32 = libc::FALLOC_FL_KEEP_SIZE;
const FALLOC_FL_PUNCH_HOLE: i32 = libc::FALLOC_FL_PUNCH_HOLE;
const FALLOC_FL_ZERO_RANGE: i32 = libc::FALLOC_FL_ZERO_RANGE;

/// A volume mounted as a FUSE file. Unmounted by [`FuseFile::stop`] (or,
/// less carefully, when dropped).
#[derive(Debug)]
pub struct FuseFile {
    session: fuser::BackgroundSession,
    path: PathBuf,
}

/// Serves `volume` as the file at `path` (created if missing). Requests run
/// on `rt`, the engine's runtime.
pub fn serve(volume: Volume, path: &Path, rt: Handle) -> Result<FuseFile, Error> {
    prepare(path)?;
    let fs = BlockFile {
        // SAFETY: getuid/getgid have no preconditions and cannot fail.
        uid: unsafe { libc::getuid() },
        // SAFETY: as above.
        gid: unsafe { libc::getgid() },
        born: SystemTime::now(),
        volume: volume.clone(),
        rt,
    };
    let mut config = fuser::Config::default();
    config.mount_options = vec![
        MountOption::FSName(format!("shorthorn:{}", volume.name())),
        MountOption::Subtype("shorthorn".into()),
        MountOption::RW,
        MountOption::NoAtime,
    ];
    // Two threads read requests from the kernel (each with its own fd);
    // the I/O itself runs on the engine's runtime.
    config.n_threads = Some(2);
    config.clone_fd = true;
    let session = fuser::Session::new(fs, path, &config)
        .and_then(fuser::Session::spawn)
        .map_err(|cause| Error::Os {
            what: "mounting FUSE on",
            path: path.display().to_string(),
            cause,
        })?;
    tracing::info!(path = %path.display(), "FUSE block file mounted");
    Ok(FuseFile {
        session,
        path: path.to_owned(),
    })
}

impl FuseFile {
    /// Unmounts. If the file is still open (a loop device over it), it is
    /// detached lazily and I/O through it fails once this process exits.
    pub async fn stop(self) -> Result<(), Error> {
        let path = self.path;
        let session = self.session;
        // The unmount returns once the kernel let go of the file; joining
        // then waits for the request threads, which end on its DESTROY.
        let r = tokio::task::spawn_blocking(move || session.umount_and_join())
            .await
            .map_err(|e| Error::Os {
                what: "unmounting",
                path: path.display().to_string(),
                cause: std::io::Error::other(e),
            })?;
        match r {
            Ok(()) => {
                tracing::info!(path = %path.display(), "FUSE block file unmounted");
                Ok(())
            }
            Err(e) if e.raw_os_error() == Some(libc::EBUSY) => {
                // The request threads keep serving the open file until this
                // process exits; then the kernel fails its I/O.
                tracing::warn!(
                    path = %path.display(),
                    "FUSE block file still in use (a loop device over it?); detaching it lazily"
                );
                detach(&path)
            }
            Err(cause) => Err(Error::Os {
                what: "unmounting",
                path: path.display().to_string(),
                cause,
            }),
        }
    }
}

/// Makes `path` a regular file nobody serves: creates it if missing,
/// detaches a mount left by a killed engine, refuses one a live process
/// serves or anything that is not a regular file. [`serve`] does it; the
/// engine also does it before touching any replica, so a bad path is
/// reported first.
pub fn prepare(path: &Path) -> Result<(), Error> {
    let bad = |reason: &str| Error::BadPath {
        path: path.display().to_string(),
        reason: reason.to_owned(),
    };
    let parent = crate::parent_dir(path).ok_or_else(|| bad("is the root directory"))?;
    let parent_dev = std::fs::metadata(parent)
        .map_err(|e| bad(&format!("its directory is not usable: {e}")))?
        .dev();
    match std::fs::metadata(path) {
        Err(e) if e.raw_os_error() == Some(libc::ENOTCONN) => detach_dead(path)?,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(path)
                .map_err(|cause| Error::Os {
                    what: "creating",
                    path: path.display().to_string(),
                    cause,
                })?;
        }
        Err(cause) => {
            return Err(Error::Os {
                what: "inspecting",
                path: path.display().to_string(),
                cause,
            })
        }
        Ok(m) if m.dev() != parent_dev => {
            // Something is mounted there. Attributes may come from the
            // kernel's cache, so ask the server itself: opening reaches it,
            // and a dead one answers "not connected".
            match std::fs::File::open(path) {
                Err(e) if e.raw_os_error() == Some(libc::ENOTCONN) => detach_dead(path)?,
                _ => {
                    return Err(Error::Busy {
                        path: path.display().to_string(),
                    })
                }
            }
        }
        Ok(m) if !m.is_file() => {
            return Err(bad(
                "is not a regular file; give the path of a file to serve the volume on",
            ))
        }
        Ok(_) => {}
    }
    Ok(())
}

/// Detaches a mount whose server is gone ("transport endpoint is not
/// connected": an engine killed while serving it).
fn detach_dead(path: &Path) -> Result<(), Error> {
    tracing::warn!(path = %path.display(), "detaching a FUSE mount left by an engine that stopped");
    detach(path)
}

fn detach(path: &Path) -> Result<(), Error> {
    nix::mount::umount2(path, nix::mount::MntFlags::MNT_DETACH).map_err(|e| Error::Os {
        what: "detaching",
        path: path.display().to_string(),
        cause: e.into(),
    })
}

/// The filesystem: one regular file, the root inode, as large as the volume.
struct BlockFile {
    volume: Volume,
    rt: Handle,
    uid: u32,
    gid: u32,
    born: SystemTime,
}

impl BlockFile {
    fn attr(&self) -> FileAttr {
        let size = self.volume.size();
        FileAttr {
            ino: INodeNo::ROOT,
            size,
            blocks: size.div_ceil(512),
            atime: self.born,
            mtime: self.born,
            ctime: self.born,
            crtime: self.born,
            kind: FileType::RegularFile,
            perm: 0o600,
            nlink: 1,
            uid: self.uid,
            gid: self.gid,
            rdev: 0,
            blksize: 4096,
            flags: 0,
        }
    }

    /// Runs `f` on the engine's runtime; `f` answers the kernel itself.
    fn spawn(&self, f: impl std::future::Future<Output = ()> + Send + 'static) {
        self.rt.spawn(f);
    }
}

/// The one place engine errors become errno values for the kernel.
fn errno(e: &engine::Error) -> Errno {
    match e.kind() {
        ErrorKind::InvalidArgument => Errno::EINVAL,
        // Only a write can reach past the end (reads and trims are clipped
        // to the size): the block device answer is "no space".
        ErrorKind::OutOfRange => Errno::ENOSPC,
        ErrorKind::NotFound
        | ErrorKind::AlreadyExists
        | ErrorKind::Unavailable
        | ErrorKind::Corrupt
        | ErrorKind::Io
        | ErrorKind::FailedPrecondition
        | ErrorKind::Busy => Errno::EIO,
    }
}

/// Trims `[offset, offset+len)` in pieces the engine accepts.
async fn unmap_range(volume: &Volume, offset: u64, len: u64) -> Result<(), engine::Error> {
    for (at, n) in request_pieces(offset, len) {
        volume.unmap_bytes(at, n).await?;
    }
    Ok(())
}

impl Filesystem for BlockFile {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> std::io::Result<()> {
        let _ = config.set_max_write(MAX_WRITE);
        let _ = config.set_max_background(MAX_BACKGROUND);
        let _ = config.set_congestion_threshold(MAX_BACKGROUND * 3 / 4);
        if let Err(missing) = config.add_capabilities(InitFlags::FUSE_ASYNC_DIO) {
            tracing::info!(
                ?missing,
                "kernel lacks FUSE_ASYNC_DIO; direct I/O is serialized"
            );
        }
        Ok(())
    }

    fn getattr(&self, _req: &Request, _ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        reply.attr(&ATTR_TTL, &self.attr());
    }

    fn setattr(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _mode: Option<u32>,
        _uid: Option<u32>,
        _gid: Option<u32>,
        size: Option<u64>,
        _atime: Option<fuser::TimeOrNow>,
        _mtime: Option<fuser::TimeOrNow>,
        _ctime: Option<SystemTime>,
        _fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        if size.is_some_and(|s| s != self.volume.size()) {
            tracing::warn!(
                requested = size,
                "refused a truncate of the volume file: expand the volume through the engine"
            );
            return reply.error(Errno::EPERM);
        }
        // Owner, mode and times are fixed; accept and report them unchanged
        // so tools that touch the file do not fail.
        reply.attr(&ATTR_TTL, &self.attr());
    }

    fn getxattr(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _name: &OsStr,
        _size: u32,
        reply: ReplyXattr,
    ) {
        // The file has no extended attributes (the kernel asks for
        // security labels on every open).
        reply.error(Errno::ENODATA);
    }

    fn listxattr(&self, _req: &Request, _ino: INodeNo, size: u32, reply: ReplyXattr) {
        if size == 0 {
            reply.size(0);
        } else {
            reply.data(&[]);
        }
    }

    fn open(&self, _req: &Request, _ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        reply.opened(FileHandle(0), FopenFlags::empty());
    }

    fn read(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        let len = self
            .volume
            .size()
            .saturating_sub(offset)
            .min(u64::from(size));
        if len == 0 {
            return reply.data(&[]);
        }
        let v = self.volume.clone();
        self.spawn(async move {
            match v.read_bytes(offset, len).await {
                Ok(d) => reply.data(&d),
                Err(e) => {
                    tracing::debug!(offset, len, error = %e, "read failed");
                    reply.error(errno(&e));
                }
            }
        });
    }

    fn write(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        data: &[u8],
        _write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        if data.is_empty() {
            return reply.written(0);
        }
        let n = u32::try_from(data.len()).expect("bounded by max_write");
        let data = Bytes::copy_from_slice(data);
        let v = self.volume.clone();
        self.spawn(async move {
            match v.write_bytes(offset, data).await {
                Ok(()) => reply.written(n),
                Err(e) => {
                    tracing::debug!(offset, len = n, error = %e, "write failed");
                    reply.error(errno(&e));
                }
            }
        });
    }

    fn flush(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _lock_owner: LockOwner,
        reply: ReplyEmpty,
    ) {
        self.flush_to(reply);
    }

    fn fsync(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        self.flush_to(reply);
    }

    fn fallocate(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        length: u64,
        mode: i32,
        reply: ReplyEmpty,
    ) {
        let trims = mode == FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE
            || mode & !FALLOC_FL_KEEP_SIZE == FALLOC_FL_ZERO_RANGE;
        if !trims {
            return reply.error(Errno::EOPNOTSUPP);
        }
        let size = self.volume.size();
        let Some(end) = offset.checked_add(length) else {
            return reply.error(Errno::EINVAL);
        };
        if end > size && mode & FALLOC_FL_KEEP_SIZE == 0 {
            return reply.error(Errno::EFBIG);
        }
        let end = end.min(size);
        if offset >= end {
            return reply.ok();
        }
        let v = self.volume.clone();
        self.spawn(async move {
            match unmap_range(&v, offset, end - offset).await {
                Ok(()) => reply.ok(),
                Err(e) => {
                    tracing::debug!(offset, end, error = %e, "trim failed");
                    reply.error(errno(&e));
                }
            }
        });
    }
}

impl BlockFile {
    fn flush_to(&self, reply: ReplyEmpty) {
        let v = self.volume.clone();
        self.spawn(async move {
            match v.flush().await {
                Ok(()) => reply.ok(),
                Err(e) => {
                    tracing::warn!(error = %e, "flush failed");
                    reply.error(errno(&e));
                }
            }
        });
    }
}
