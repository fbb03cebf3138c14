//! One layer of the chain: a sparse file whose holes mean "look further down".

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};

use nix::errno::Errno;
use nix::fcntl::{fallocate, FallocateFlags};
use nix::unistd::{lseek, Whence};

use super::extents::{ExtentSet, BLOCK_SIZE};

/// Bytes a file occupies on disk (its 512-byte `st_blocks`), as opposed to
/// its length.
pub fn allocated_bytes(md: &std::fs::Metadata) -> u64 {
    use std::os::unix::fs::MetadataExt;
    md.blocks() * 512
}

/// The largest piece one `pwrite` of a layer carries.
///
/// The kernel sizes a page-cache folio by the write that creates it, and a
/// later small write into a folio walks every buffer head of that folio. On
/// ext4 (kernel 6.18, measured with fio: 1 GiB written sequentially in
/// pieces of the given size, then 4 KiB random writes into it) rewriting
/// 4 KiB costs about 17 us of kernel CPU inside 1 MiB folios, 7.5 us inside
/// 256 KiB ones and 4 us inside 64 KiB ones, while sequential throughput
/// with 64 KiB pieces is no lower. Volumes see exactly that pattern (a
/// restore or bulk load, then a database's small random writes), so large
/// writes are cut at 64 KiB boundaries.
pub const WRITE_PIECE: u64 = 64 << 10;

/// An open layer file. Positional I/O only, so one handle serves many
/// concurrent requests without a lock.
#[derive(Debug)]
pub struct Layer {
    file: File,
    /// Read requests served from this layer; lets tests and metrics see which
    /// layers a read touched.
    reads: AtomicU64,
}

impl Layer {
    /// Opens an existing layer file read-write.
    pub fn open(path: &Path) -> io::Result<Self> {
        let file = OpenOptions::new().read(true).write(true).open(path)?;
        Ok(Self::from_file(file))
    }

    /// Creates a new, empty (all-hole) layer of `size` bytes and makes it durable.
    pub fn create(path: &Path, size: u64) -> io::Result<Self> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(path)?;
        file.set_len(size)?;
        file.sync_all()?;
        Ok(Self::from_file(file))
    }

    fn from_file(file: File) -> Self {
        Self {
            file,
            reads: AtomicU64::new(0),
        }
    }

    /// Reads exactly `buf.len()` bytes at `offset`.
    pub fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.reads.fetch_add(1, Ordering::Relaxed);
        self.file.read_exact_at(buf, offset)
    }

    /// Reads all of `buf` at `offset` only if it is in the page cache
    /// (`preadv2(RWF_NOWAIT)`); `Ok(false)` when the read would wait for the
    /// disk, or the kernel cannot tell.
    pub fn read_cached(&self, buf: &mut [u8], offset: u64) -> io::Result<bool> {
        let mut done = 0;
        while done < buf.len() {
            let at = i64::try_from(offset + done as u64)
                .map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
            let rest = &mut buf[done..];
            let iov = libc::iovec {
                iov_base: rest.as_mut_ptr().cast(),
                iov_len: rest.len(),
            };
            // SAFETY: `iov` describes `rest`, a live, exclusively borrowed
            // buffer that outlives the call; the descriptor is owned by
            // `self.file`, open for the duration of the call.
            let n = unsafe { libc::preadv2(self.file.as_raw_fd(), &iov, 1, at, libc::RWF_NOWAIT) };
            let res = if n < 0 {
                Err(Errno::last())
            } else {
                Ok(n.unsigned_abs())
            };
            match res {
                Ok(0) => return Err(io::Error::from(io::ErrorKind::UnexpectedEof)),
                Ok(n) => done += n,
                // Not cached, or the filesystem does not support the flag.
                Err(Errno::EAGAIN | Errno::EOPNOTSUPP | Errno::EINVAL) => return Ok(false),
                Err(e) => return Err(e.into()),
            }
        }
        self.reads.fetch_add(1, Ordering::Relaxed);
        Ok(true)
    }

    /// Writes all of `buf` at `offset`, in pieces that end on
    /// [`WRITE_PIECE`] boundaries of the file.
    pub fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        let mut done = 0;
        while done < buf.len() {
            let at = offset + done as u64;
            let room = WRITE_PIECE - (at % WRITE_PIECE);
            let n = (buf.len() - done).min(usize::try_from(room).unwrap_or(usize::MAX));
            self.file.write_all_at(&buf[done..done + n], at)?;
            done += n;
        }
        Ok(())
    }

    /// Deallocates `[offset, offset+len)`; it reads back as zeros and, in the
    /// chain, as "not in this layer".
    pub fn punch_hole(&self, offset: u64, len: u64) -> io::Result<()> {
        let off =
            i64::try_from(offset).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
        let l = i64::try_from(len).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
        fallocate(
            self.file.as_raw_fd(),
            FallocateFlags::FALLOC_FL_PUNCH_HOLE | FallocateFlags::FALLOC_FL_KEEP_SIZE,
            off,
            l,
        )
        .map_err(io::Error::from)
    }

    /// Makes everything written so far durable, data and allocation metadata
    /// (hole punches included, which `fdatasync` is not guaranteed to cover).
    pub fn sync(&self) -> io::Result<()> {
        self.file.sync_all()
    }

    /// Grows the file to `size` bytes (new space is a hole).
    pub fn set_len(&self, size: u64) -> io::Result<()> {
        self.file.set_len(size)
    }

    /// The file's length in bytes.
    pub fn file_len(&self) -> io::Result<u64> {
        Ok(self.file.metadata()?.len())
    }

    /// Bytes actually allocated on disk.
    pub fn allocated_bytes(&self) -> io::Result<u64> {
        Ok(allocated_bytes(&self.file.metadata()?))
    }

    /// How many reads this handle has served.
    pub fn read_count(&self) -> u64 {
        self.reads.load(Ordering::Relaxed)
    }

    /// (device, inode) of the file, to recognise hard links.
    pub fn identity(&self) -> io::Result<(u64, u64)> {
        use std::os::unix::fs::MetadataExt;
        let m = self.file.metadata()?;
        Ok((m.dev(), m.ino()))
    }

    /// Builds the layer's extent set from the file itself with
    /// `SEEK_DATA`/`SEEK_HOLE`, looking at the first `size` bytes.
    pub fn scan_extents(&self, size: u64) -> io::Result<ExtentSet> {
        self.scan_extents_in(0..size)
    }

    /// The data extents within the byte range `range` (block-aligned). Extent
    /// edges are widened to whole blocks.
    pub fn scan_extents_in(&self, range: std::ops::Range<u64>) -> io::Result<ExtentSet> {
        let mut set = ExtentSet::new();
        let end = range.end.min(self.file_len()?);
        let mut pos: u64 = range.start;
        let fd = self.file.as_raw_fd();
        while pos < end {
            let at =
                i64::try_from(pos).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
            let data = match lseek(fd, at, Whence::SeekData) {
                Ok(d) => u64::try_from(d).unwrap_or(u64::MAX),
                Err(Errno::ENXIO) => break,
                Err(e) => return Err(e.into()),
            };
            if data >= end {
                break;
            }
            let data_at =
                i64::try_from(data).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
            let hole = match lseek(fd, data_at, Whence::SeekHole) {
                Ok(h) => u64::try_from(h).unwrap_or(u64::MAX).min(end),
                Err(Errno::ENXIO) => end,
                Err(e) => return Err(e.into()),
            };
            set.add(data / BLOCK_SIZE..hole.div_ceil(BLOCK_SIZE));
            pos = hole;
        }
        Ok(set)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A write crossing several piece boundaries, starting and ending
    /// inside a piece, lands whole and nowhere else.
    #[test]
    fn a_write_cut_into_pieces_lands_whole() {
        let dir = tempfile::tempdir().unwrap();
        let l = Layer::create(&dir.path().join("l.img"), 1 << 20).unwrap();
        let data: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8 + 1).collect();
        let at = WRITE_PIECE - 4096;
        l.write_at(&data, at).unwrap();
        let mut back = vec![0u8; data.len() + 8192];
        l.read_at(&mut back, at - 4096).unwrap();
        assert!(back[..4096].iter().all(|&b| b == 0));
        assert_eq!(&back[4096..4096 + data.len()], &data[..]);
        assert!(back[4096 + data.len()..].iter().all(|&b| b == 0));
    }
}
