//! The replica protocol over real loopback TCP: many requests in flight,
//! errors carried back with their kind, and hostile frames refused without
//! touching data or disturbing other connections.

#![allow(clippy::cast_possible_truncation)] // test arithmetic on small, known sizes

use std::sync::Arc;

use bytes::Bytes;
use shorthorn::error::ErrorKind;
use shorthorn::replica::client::{Client, ClientError};
use shorthorn::replica::wire::{Op, RequestHeader, ResponseHeader, RESPONSE_HEADER_LEN};
use shorthorn::replica::{server, Replica};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const SIZE: u64 = 64 << 20;

async fn start() -> (tempfile::TempDir, String, Arc<Replica>) {
    let dir = tempfile::tempdir().unwrap();
    let r = Arc::new(Replica::open(dir.path(), Some(SIZE)).unwrap());
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap().to_string();
    tokio::spawn(server::serve(l, Arc::clone(&r)));
    (dir, addr, r)
}

fn block(i: u64, v: u8) -> Vec<u8> {
    let mut b = vec![v; 4096];
    b[..8].copy_from_slice(&i.to_le_bytes());
    b
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_requests_in_flight_on_one_connection() {
    let (_d, addr, _r) = start().await;
    let c = Client::connect(&addr).await.unwrap();
    let mut tasks = Vec::new();
    for i in 0..512u64 {
        let c = c.clone();
        tasks.push(tokio::spawn(async move {
            c.write(i * 4096, Bytes::from(block(i, 0x5a)))
                .await
                .unwrap();
            let back = c.read(i * 4096, 4096).await.unwrap();
            assert_eq!(back, block(i, 0x5a), "block {i}");
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    c.flush().await.unwrap();
    // A large read spanning everything written comes back in one piece.
    let all = c.read(0, 512 * 4096).await.unwrap();
    for i in 0..512u64 {
        assert_eq!(
            &all[i as usize * 4096..(i as usize + 1) * 4096],
            block(i, 0x5a).as_slice()
        );
    }
    assert_eq!(c.info().await.unwrap().revision, 512);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn errors_come_back_with_their_kind() {
    let (_d, addr, _r) = start().await;
    let c = Client::connect(&addr).await.unwrap();
    let kind = |e: ClientError| e.kind();
    assert_eq!(
        kind(c.write(100, Bytes::from(vec![0; 4096])).await.unwrap_err()),
        ErrorKind::InvalidArgument
    );
    assert_eq!(
        kind(c.read(SIZE, 4096).await.unwrap_err()),
        ErrorKind::OutOfRange
    );
    assert_eq!(
        kind(c.revert("nope").await.unwrap_err()),
        ErrorKind::NotFound
    );
    c.snapshot("one", Default::default()).await.unwrap();
    assert_eq!(
        kind(c.snapshot("one", Default::default()).await.unwrap_err()),
        ErrorKind::AlreadyExists
    );
    // The connection is still usable after refused requests.
    c.write(0, Bytes::from(block(0, 1))).await.unwrap();
    let list = c.list().await.unwrap();
    assert_eq!(list.len(), 2);
    assert_eq!(list[1].name, "one");
    let page = c.extents("head", 0, 100).await.unwrap();
    assert_eq!(page.extents.len(), 1);
    assert_eq!(page.extents[0].crc32c, crc32c::crc32c(&block(0, 1)));
}

/// Sends raw bytes, then reads the one error response and expects the
/// connection to be closed after it.
async fn refused(addr: &str, bytes: &[u8]) -> ResponseHeader {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(bytes).await.unwrap();
    let mut hb = [0u8; RESPONSE_HEADER_LEN];
    s.read_exact(&mut hb).await.unwrap();
    let h = ResponseHeader::decode(&hb).unwrap();
    let mut msg = vec![0u8; h.payload_len as usize];
    s.read_exact(&mut msg).await.unwrap();
    let mut rest = Vec::new();
    let n = tokio::time::timeout(std::time::Duration::from_secs(5), s.read_to_end(&mut rest))
        .await
        .expect("server closes the connection")
        .unwrap_or(0);
    assert_eq!(n, 0, "nothing after the error response");
    h
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_frames_are_refused_and_touch_nothing() {
    let (_d, addr, r) = start().await;
    let c = Client::connect(&addr).await.unwrap();
    c.write(0, Bytes::from(block(0, 0x77))).await.unwrap();
    let rev = r.revision();

    // Garbage header.
    let h = refused(&addr, &[0xee; 44]).await;
    assert_eq!(h.status, Some(ErrorKind::InvalidArgument));

    // A write whose payload was corrupted in transit: refused with its id, not stored.
    let good = block(0, 0x11);
    let hdr = RequestHeader::new(Op::Write, 99, 0, 4096, &good).encode();
    let mut bad = good.clone();
    bad[4000] ^= 0x40;
    let mut frame = hdr.to_vec();
    frame.extend(&bad);
    let h = refused(&addr, &frame).await;
    assert_eq!((h.id, h.status), (99, Some(ErrorKind::Corrupt)));

    // A header announcing a payload beyond the limit is refused before the payload is read.
    let mut huge = RequestHeader::new(Op::Write, 5, 0, 0, &[]);
    huge.length = 1 << 40;
    huge.payload_len = u32::MAX;
    let h = refused(&addr, &huge.encode()).await;
    assert_eq!((h.id, h.status), (5, Some(ErrorKind::InvalidArgument)));

    // Unknown op with an intact header.
    let mut unk = RequestHeader::new(Op::Flush, 6, 0, 0, &[]).encode();
    unk[5] = 200;
    let crc = crc32c::crc32c(&unk[..40]);
    unk[40..44].copy_from_slice(&crc.to_le_bytes());
    let h = refused(&addr, &unk).await;
    assert_eq!((h.id, h.status), (6, Some(ErrorKind::InvalidArgument)));

    // Malformed control body.
    let body = b"{\"name\": 5}";
    let mut frame = RequestHeader::new(Op::Snapshot, 8, 0, 0, body)
        .encode()
        .to_vec();
    frame.extend(body);
    let mut s = TcpStream::connect(&addr).await.unwrap();
    s.write_all(&frame).await.unwrap();
    let mut hb = [0u8; RESPONSE_HEADER_LEN];
    s.read_exact(&mut hb).await.unwrap();
    assert_eq!(
        ResponseHeader::decode(&hb).unwrap().status,
        Some(ErrorKind::InvalidArgument)
    );

    // Random noise in many shapes.
    let mut seed = 0x9e3779b97f4a7c15u64;
    for _ in 0..64 {
        let mut noise = vec![0u8; 200];
        for b in noise.iter_mut() {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            *b = seed as u8;
        }
        let mut s = TcpStream::connect(&addr).await.unwrap();
        let _ = s.write_all(&noise).await;
        let mut sink = Vec::new();
        let _ = tokio::time::timeout(std::time::Duration::from_secs(5), s.read_to_end(&mut sink))
            .await
            .expect("closed");
    }

    // Nothing changed, and the original connection still works.
    assert_eq!(r.revision(), rev);
    assert_eq!(c.read(0, 4096).await.unwrap(), block(0, 0x77));
    r.check_index().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_replica_fails_calls_after_the_timeout_instead_of_hanging() {
    // Accepts connections and never answers.
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap().to_string();
    let hold = tokio::spawn(async move {
        let mut held = Vec::new();
        loop {
            let (s, _) = l.accept().await.unwrap();
            held.push(s);
        }
    });
    let timeout = std::time::Duration::from_millis(300);
    let c = Client::connect_with_timeout(&addr, timeout).await.unwrap();
    let other = {
        let c = c.clone();
        tokio::spawn(async move { c.read(0, 4096).await })
    };
    let started = std::time::Instant::now();
    let e = c.flush().await.unwrap_err();
    // Whichever waiting call times out first tears the connection down; the
    // other sees it lost.
    assert!(
        matches!(e, ClientError::Timeout(_) | ClientError::Disconnected),
        "{e}"
    );
    assert_eq!(e.kind(), ErrorKind::Unavailable);
    assert!(started.elapsed() < std::time::Duration::from_secs(5));
    // The other waiting call fails too, and later calls fail at once.
    assert!(other.await.unwrap().is_err());
    assert!(matches!(
        c.info().await.unwrap_err(),
        ClientError::Disconnected
    ));
    hold.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_oversized_request_is_refused_locally_and_the_connection_survives() {
    let (_d, addr, _r) = start().await;
    let c = Client::connect(&addr).await.unwrap();
    let e = c.read(0, 16 << 20).await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::InvalidArgument);
    c.write(0, Bytes::from(block(0, 3))).await.unwrap();
    assert_eq!(c.read(0, 4096).await.unwrap(), block(0, 3));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn more_large_requests_than_the_memory_budget_all_complete() {
    // 24 x 8 MiB in flight is three times a connection's 64 MiB budget: the
    // server must keep making progress, not wait on budget its own queued
    // requests hold.
    let (_d, addr, _r) = start().await;
    let c = Client::connect(&addr).await.unwrap();
    let chunk = 8u64 << 20;
    let mut tasks = Vec::new();
    for i in 0..24u64 {
        let c = c.clone();
        tasks.push(tokio::spawn(async move {
            let off = (i % 8) * chunk;
            c.write(off, Bytes::from(vec![i as u8; chunk as usize]))
                .await
                .unwrap();
            c.read(off, chunk).await.unwrap().len()
        }));
    }
    let done = tokio::time::timeout(std::time::Duration::from_secs(60), async {
        for t in tasks {
            assert_eq!(t.await.unwrap(), chunk as usize);
        }
    })
    .await;
    assert!(done.is_ok(), "large pipelined requests stalled");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_that_miss_the_page_cache_and_writes_during_snapshots_are_served() {
    let (dir, addr, r) = start().await;
    let c = Client::connect(&addr).await.unwrap();
    for i in 0..256u64 {
        c.write(i * 4096, Bytes::from(block(i, 0x21)))
            .await
            .unwrap();
    }
    c.flush().await.unwrap();
    // Drop the head's pages from the page cache: reads must now take the
    // path that waits for the disk, and still return the data.
    let head = std::fs::File::open(dir.path().join("volume-head-000.img")).unwrap();
    nix::fcntl::posix_fadvise(
        std::os::fd::AsRawFd::as_raw_fd(&head),
        0,
        0,
        nix::fcntl::PosixFadviseAdvice::POSIX_FADV_DONTNEED,
    )
    .unwrap();
    let all = c.read(0, 256 * 4096).await.unwrap();
    for i in 0..256u64 {
        assert_eq!(
            &all[i as usize * 4096..(i as usize + 1) * 4096],
            block(i, 0x21).as_slice()
        );
    }

    // Writers keep going while snapshots are taken; each write lands either
    // before or after a snapshot, and the head ends with the last of each.
    let mut writers = Vec::new();
    for w in 0..4u64 {
        let c = c.clone();
        writers.push(tokio::spawn(async move {
            for round in 0..50u8 {
                for i in (w * 64)..(w * 64 + 64) {
                    c.write(i * 4096, Bytes::from(block(i, round)))
                        .await
                        .unwrap();
                }
            }
        }));
    }
    for n in 0..10 {
        c.snapshot(&format!("live-{n}"), Default::default())
            .await
            .unwrap();
    }
    for w in writers {
        w.await.unwrap();
    }
    let all = c.read(0, 256 * 4096).await.unwrap();
    for i in 0..256u64 {
        assert_eq!(
            &all[i as usize * 4096..(i as usize + 1) * 4096],
            block(i, 49).as_slice(),
            "block {i}"
        );
    }
    r.check_index().unwrap();
    // Every snapshot shows, for each block, one of the rounds written to it.
    for n in 0..10 {
        c.revert(&format!("live-{n}")).await.unwrap();
        let snap = c.read(0, 256 * 4096).await.unwrap();
        for i in 0..256u64 {
            let got = &snap[i as usize * 4096..(i as usize + 1) * 4096];
            assert_eq!(&got[..8], &i.to_le_bytes(), "snapshot live-{n} block {i}");
            assert!(
                got[8..].iter().all(|&b| b == got[8]),
                "snapshot live-{n} block {i} is torn"
            );
        }
    }
}
