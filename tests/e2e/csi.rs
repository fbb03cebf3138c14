//! The CSI driver end to end, as kubelet and the sidecars drive it: a
//! controller and three node processes (127.0.0.2-4, a disk directory
//! each), volumes created with three replicas, published to a node (its
//! engine starts there), staged (loop device over the engine's FUSE file,
//! mkfs only when blank, mount), published into target paths (bind,
//! read-only, raw block), and torn down in reverse. Data written through
//! one node is read back through another after the volume moves.

use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use shorthorn::csi;
use shorthorn::csi::volume_capability::access_mode::Mode;
use shorthorn::csi::volume_capability::{AccessMode, AccessType, BlockVolume, MountVolume};
use tonic::Code;

use super::cluster::csi::{connect, create_req, Ctl, GIB};
use super::require_root;

const MIB: u64 = 1 << 20;

fn cap(fs: Option<&str>) -> csi::VolumeCapability {
    csi::VolumeCapability {
        access_type: Some(match fs {
            Some(fs) => AccessType::Mount(MountVolume {
                fs_type: fs.into(),
                mount_flags: vec!["noatime".into()],
                volume_mount_group: String::new(),
            }),
            None => AccessType::Block(BlockVolume {}),
        }),
        access_mode: Some(AccessMode {
            mode: Mode::SingleNodeWriter as i32,
        }),
    }
}

/// `findmnt`'s view of `path`: (fstype, options), or None when nothing is
/// mounted exactly there.
fn findmnt(path: &Path) -> Option<(String, String)> {
    let out = Command::new("findmnt")
        .args(["-n", "-o", "FSTYPE,OPTIONS", "--mountpoint"])
        .arg(path)
        .output()
        .expect("findmnt (util-linux) is needed");
    if !out.status.success() {
        return None;
    }
    let s = String::from_utf8_lossy(&out.stdout);
    let line = s.lines().last()?.trim().to_owned();
    let (fs, opts) = line.split_once(char::is_whitespace)?;
    Some((fs.to_owned(), opts.trim().to_owned()))
}

async fn cluster(dir: &Path) -> Ctl {
    require_root();
    let mut c = connect(dir).await;
    c.add_three(dir, 10).await;
    c
}

struct Paths {
    staging: PathBuf,
    target: PathBuf,
}

fn paths(dir: &Path, vol: &str, node: usize) -> Paths {
    let staging = dir.join(format!("kubelet-{node}/staging/{vol}"));
    std::fs::create_dir_all(&staging).unwrap();
    Paths {
        staging,
        target: dir.join(format!("kubelet-{node}/pods/{vol}/mount")),
    }
}

async fn publish(
    c: &Ctl,
    vol: &str,
    node: usize,
    cap: &csi::VolumeCapability,
) -> csi::ControllerPublishVolumeResponse {
    c.controller()
        .controller_publish_volume(csi::ControllerPublishVolumeRequest {
            volume_id: vol.into(),
            node_id: format!("node-{node}"),
            volume_capability: Some(cap.clone()),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
}

async fn stage(
    c: &Ctl,
    vol: &str,
    node: usize,
    p: &Paths,
    cap: &csi::VolumeCapability,
    ctx: &std::collections::HashMap<String, String>,
) -> Result<(), tonic::Status> {
    c.node(node)
        .await
        .node_stage_volume(csi::NodeStageVolumeRequest {
            volume_id: vol.into(),
            publish_context: ctx.clone(),
            staging_target_path: p.staging.display().to_string(),
            volume_capability: Some(cap.clone()),
            ..Default::default()
        })
        .await
        .map(|_| ())
}

async fn node_publish(
    c: &Ctl,
    vol: &str,
    node: usize,
    p: &Paths,
    target: &Path,
    cap: &csi::VolumeCapability,
    readonly: bool,
) -> Result<(), tonic::Status> {
    c.node(node)
        .await
        .node_publish_volume(csi::NodePublishVolumeRequest {
            volume_id: vol.into(),
            staging_target_path: p.staging.display().to_string(),
            target_path: target.display().to_string(),
            volume_capability: Some(cap.clone()),
            readonly,
            ..Default::default()
        })
        .await
        .map(|_| ())
}

/// Unpublishes `targets`, unstages and controller-unpublishes, each twice
/// (every step is idempotent).
async fn tear_down(c: &Ctl, vol: &str, node: usize, p: &Paths, targets: &[&Path]) {
    let mut n = c.node(node).await;
    for t in targets {
        for _ in 0..2 {
            n.node_unpublish_volume(csi::NodeUnpublishVolumeRequest {
                volume_id: vol.into(),
                target_path: t.display().to_string(),
            })
            .await
            .unwrap();
        }
        assert!(!t.exists(), "{} left behind", t.display());
    }
    for _ in 0..2 {
        n.node_unstage_volume(csi::NodeUnstageVolumeRequest {
            volume_id: vol.into(),
            staging_target_path: p.staging.display().to_string(),
        })
        .await
        .unwrap();
    }
    assert_eq!(findmnt(&p.staging), None, "staging path still mounted");
    for _ in 0..2 {
        c.controller()
            .controller_unpublish_volume(csi::ControllerUnpublishVolumeRequest {
                volume_id: vol.into(),
                node_id: format!("node-{node}"),
                secrets: Default::default(),
            })
            .await
            .unwrap();
    }
}

async fn instances(c: &Ctl, node: usize) -> Vec<shorthorn::api::agent::Instance> {
    c.nodes[node]
        .agent()
        .await
        .list_instances(shorthorn::api::agent::ListInstancesRequest {})
        .await
        .unwrap()
        .into_inner()
        .instances
}

/// Waits until the volume's engine on `node` has every replica read-write
/// and the controller records it attached (healthy).
async fn healthy(c: &mut Ctl, vol: &str, node: usize) {
    healthy_with(c, vol, node, 3).await;
}

/// [`healthy`], with `n` replicas.
async fn healthy_with(c: &mut Ctl, vol: &str, node: usize, n: usize) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    loop {
        let st = c.nodes[node]
            .agent()
            .await
            .engine_status(shorthorn::api::agent::EngineStatusRequest {
                volume_id: vol.into(),
            })
            .await
            .unwrap()
            .into_inner();
        let all_rw = st.replicas.len() == n && st.replicas.iter().all(|r| r.mode == "read_write");
        if all_rw && st.health == "healthy" && c.record(vol).await["state"] == "attached" {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "never healthy again: {st:?}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
}

fn wait_for(mut f: impl FnMut() -> bool, what: &str) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while !f() {
        assert!(
            std::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}

fn write_file(path: &Path, data: &[u8]) {
    let mut f = std::fs::File::create(path).unwrap();
    f.write_all(data).unwrap();
    f.sync_all().unwrap();
}

fn pattern(seed: u8, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| seed.wrapping_add((i % 251) as u8) ^ (i >> 12) as u8)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_filesystem_volume_is_staged_published_and_follows_its_volume_to_another_node() {
    let dir = tempfile::tempdir().unwrap();
    require_root();
    // node-0, where the volume is first attached, starts its processes
    // through a launcher, as it does in its pod.
    let mut c = connect(dir.path()).await;
    c.add_node_launched(dir.path(), 0, "z1", 10).await;
    c.add_node(dir.path(), 1, "z2", 10).await;
    c.add_node(dir.path(), 2, "z3", 10).await;
    let vol = "pvc-life";
    c.controller()
        .create_volume(create_req(vol, (256 * MIB) as i64, &[("fsType", "ext4")]))
        .await
        .unwrap();
    let ext4 = cap(Some("ext4"));

    // Publish: the engine starts on node-0; the volume is attached there.
    let ctx = publish(&c, vol, 0, &ext4).await.publish_context;
    assert_eq!(ctx.get(csi::CTX_FRONTEND).map(String::as_str), Some("fuse"));
    assert_eq!(
        publish(&c, vol, 0, &ext4).await.publish_context,
        ctx,
        "idempotent"
    );
    let rec = c.record(vol).await;
    assert_eq!(rec["state"], "attached");
    assert_eq!(rec["published_node"], "node-0");
    let e = c
        .controller()
        .controller_publish_volume(csi::ControllerPublishVolumeRequest {
            volume_id: vol.into(),
            node_id: "node-1".into(),
            volume_capability: Some(ext4.clone()),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
    let e = delete_volume(&c, vol).await.unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
    let listed = c
        .controller()
        .list_volumes(csi::ListVolumesRequest::default())
        .await
        .unwrap()
        .into_inner();
    let st = listed.entries[0].status.as_ref().unwrap();
    assert_eq!(st.published_node_ids, ["node-0"]);

    // Stage: a blank device gets ext4; staging twice is the same.
    let p = paths(dir.path(), vol, 0);
    stage(&c, vol, 0, &p, &ext4, &ctx).await.unwrap();
    stage(&c, vol, 0, &p, &ext4, &ctx).await.unwrap();
    let (fs, opts) = findmnt(&p.staging).expect("staged");
    assert_eq!(fs, "ext4");
    assert!(opts.contains("noatime"), "mount flags applied: {opts}");

    // Publish into a pod's directory, writable, and a second one read-only.
    node_publish(&c, vol, 0, &p, &p.target, &ext4, false)
        .await
        .unwrap();
    node_publish(&c, vol, 0, &p, &p.target, &ext4, false)
        .await
        .unwrap();
    let ro = p.target.with_file_name("ro");
    node_publish(&c, vol, 0, &p, &ro, &ext4, true)
        .await
        .unwrap();
    let e = node_publish(&c, vol, 0, &p, &ro, &ext4, false)
        .await
        .unwrap_err();
    assert_eq!(
        e.code(),
        Code::AlreadyExists,
        "ro target republished rw: {e:?}"
    );
    let data = pattern(7, 3 * MIB as usize + 123);
    write_file(&p.target.join("data.bin"), &data);
    assert_eq!(std::fs::read(ro.join("data.bin")).unwrap(), data);
    let e = std::fs::File::create(ro.join("nope")).unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::EROFS));

    // Stats: bytes and inodes of the filesystem; a healthy volume.
    let stats = c
        .node(0)
        .await
        .node_get_volume_stats(csi::NodeGetVolumeStatsRequest {
            volume_id: vol.into(),
            volume_path: p.target.display().to_string(),
            staging_target_path: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    let bytes = &stats.usage[0];
    assert!(
        bytes.total > (200 * MIB) as i64 && bytes.total <= (256 * MIB) as i64,
        "{bytes:?}"
    );
    assert!(bytes.used >= data.len() as i64, "{bytes:?}");
    assert!(
        stats.usage[1].total > 0 && stats.usage[1].used > 0,
        "inodes: {:?}",
        stats.usage[1]
    );
    let cond = stats.volume_condition.unwrap();
    assert!(!cond.abnormal, "{cond:?}");

    // The node plugin's container is restarted: the plugin and every
    // process descended from it are SIGKILLed. Its engine and replica are
    // the launcher's children, so the volume keeps serving; started again,
    // the node adopts them, and restarts the replica when it dies.
    let launcher = c.nodes[0].launcher.as_ref().unwrap().0.id();
    let launched: Vec<u32> = super::cluster::csi::parents()
        .into_iter()
        .filter(|(_, ppid)| *ppid == launcher)
        .map(|(pid, _)| pid)
        .collect();
    assert_eq!(
        launched.len(),
        2,
        "the engine and the replica are the launcher's"
    );
    c.nodes[0].kill_container_and_restart();
    for pid in &launched {
        assert!(
            std::path::Path::new(&format!("/proc/{pid}")).exists(),
            "launched process {pid} outlives the node plugin's container"
        );
    }
    // A restart that begins with SIGTERM (a failed liveness probe) leaves
    // them running too: they are the launcher's to stop.
    c.nodes[0].term_and_restart();
    for pid in &launched {
        assert!(
            std::path::Path::new(&format!("/proc/{pid}")).exists(),
            "launched process {pid} outlives a SIGTERMed node plugin"
        );
    }
    let more = pattern(8, 64 * 1024);
    write_file(&p.target.join("more.bin"), &more);
    let listed = instances(&c, 0).await;
    assert!(
        listed
            .iter()
            .any(|i| i.kind == "engine" && i.volume_id == vol && i.running),
        "engine adopted: {listed:?}"
    );
    let replica = listed
        .iter()
        .find(|i| i.kind == "replica" && i.volume_id == vol)
        .expect("replica adopted")
        .clone();
    assert!(replica.running);
    let out = Command::new("pkill")
        .args(["-KILL", "-f", &format!("listen {}", replica.address)])
        .status()
        .unwrap();
    assert!(
        out.success(),
        "the adopted replica process is found by its command line"
    );
    wait_for(
        || std::net::TcpStream::connect(&replica.address).is_err(),
        "replica to die",
    );
    wait_for(
        || std::net::TcpStream::connect(&replica.address).is_ok(),
        "replica to be restarted",
    );
    assert_eq!(std::fs::read(p.target.join("more.bin")).unwrap(), more);

    // The engine failed the killed replica; once it serves again the
    // controller has the engine rebuild it, and the volume is healthy.
    healthy(&mut c, vol, 0).await;
    // A replica that stops answering (frozen) is failed by the engine after
    // its timeout: the volume shows degraded, I/O goes on, and the replica
    // is rebuilt once it answers again.
    let pid = String::from_utf8(
        Command::new("pgrep")
            .args(["-f", &format!("listen {}", replica.address)])
            .output()
            .unwrap()
            .stdout,
    )
    .unwrap()
    .trim()
    .to_owned();
    assert!(!pid.is_empty());
    Command::new("kill").args(["-STOP", &pid]).status().unwrap();
    let during = pattern(11, 256 * 1024);
    write_file(&p.target.join("during.bin"), &during);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        let rec = c.record(vol).await;
        if rec["state"] == "degraded" {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "never degraded: {rec}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
    let got = c
        .controller()
        .controller_get_volume(csi::ControllerGetVolumeRequest {
            volume_id: vol.into(),
        })
        .await
        .unwrap()
        .into_inner();
    let cond = got.status.unwrap().volume_condition.unwrap();
    assert!(cond.abnormal, "{cond:?}");
    Command::new("kill").args(["-CONT", &pid]).status().unwrap();
    healthy(&mut c, vol, 0).await;
    assert_eq!(std::fs::read(p.target.join("during.bin")).unwrap(), during);

    tear_down(&c, vol, 0, &p, &[&p.target, &ro]).await;
    let engine_file = c.nodes[0].state.join("engines").join(vol).join("volume");
    assert_eq!(
        findmnt(&engine_file),
        None,
        "the engine's FUSE file is unmounted"
    );
    assert!(
        instances(&c, 0).await.iter().all(|i| i.kind != "engine"),
        "the adopted engine is stopped"
    );
    let rec = c.record(vol).await;
    assert_eq!(rec["state"], "detached");
    assert!(rec["published_node"].is_null());

    // The volume moves to node-2: the same filesystem with the same file,
    // not reformatted.
    let ctx = publish(&c, vol, 2, &ext4).await.publish_context;
    let p2 = paths(dir.path(), vol, 2);
    stage(&c, vol, 2, &p2, &ext4, &ctx).await.unwrap();
    node_publish(&c, vol, 2, &p2, &p2.target, &ext4, false)
        .await
        .unwrap();
    assert_eq!(std::fs::read(p2.target.join("data.bin")).unwrap(), data);
    tear_down(&c, vol, 2, &p2, &[&p2.target]).await;

    // Asking for xfs on a device that holds ext4 is refused, and the data
    // is untouched.
    let xfs = cap(Some("xfs"));
    let ctx = publish(&c, vol, 1, &xfs).await.publish_context;
    let p1 = paths(dir.path(), vol, 1);
    let e = stage(&c, vol, 1, &p1, &xfs, &ctx).await.unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
    assert!(e.message().contains("ext4"), "{e:?}");
    stage(&c, vol, 1, &p1, &ext4, &ctx).await.unwrap();
    node_publish(&c, vol, 1, &p1, &p1.target, &ext4, false)
        .await
        .unwrap();
    assert_eq!(std::fs::read(p1.target.join("data.bin")).unwrap(), data);
    tear_down(&c, vol, 1, &p1, &[&p1.target]).await;

    delete_volume(&c, vol).await.unwrap();
    assert!(
        c.replica_dirs(vol).is_empty(),
        "replica directories removed"
    );
    // Unpublishing a volume that is gone is fine.
    c.controller()
        .controller_unpublish_volume(csi::ControllerUnpublishVolumeRequest {
            volume_id: vol.into(),
            node_id: "node-0".into(),
            secrets: Default::default(),
        })
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn xfs_and_raw_block_volumes_and_the_node_error_codes() {
    let dir = tempfile::tempdir().unwrap();
    let mut c = cluster(dir.path()).await;
    for v in ["pvc-xfs", "pvc-block"] {
        c.controller()
            .create_volume(create_req(v, (320 * MIB) as i64, &[]))
            .await
            .unwrap();
    }

    // Node calls refuse bad input before touching anything.
    let xfs = cap(Some("xfs"));
    let p = paths(dir.path(), "pvc-xfs", 1);
    let mut n = c.node(1).await;
    let no_ctx = std::collections::HashMap::new();
    let e = stage(&c, "pvc-xfs", 1, &p, &xfs, &no_ctx)
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "no publish context: {e:?}");
    let e = n
        .node_stage_volume(csi::NodeStageVolumeRequest {
            volume_id: "pvc-xfs".into(),
            staging_target_path: p.staging.display().to_string(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "no capability: {e:?}");
    let ctx = std::collections::HashMap::from([(csi::CTX_FRONTEND.to_owned(), "fuse".to_owned())]);
    let e = stage(&c, "pvc-xfs", 1, &p, &xfs, &ctx).await.unwrap_err();
    assert_eq!(
        e.code(),
        Code::FailedPrecondition,
        "not published here: {e:?}"
    );
    let e = stage(&c, "pvc-xfs", 1, &p, &cap(Some("btrfs")), &ctx)
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    let e = n
        .node_publish_volume(csi::NodePublishVolumeRequest {
            volume_id: "pvc-xfs".into(),
            staging_target_path: p.staging.display().to_string(),
            target_path: "relative/path".into(),
            volume_capability: Some(xfs.clone()),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    let e = node_publish(&c, "pvc-xfs", 1, &p, &p.target, &xfs, false)
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition, "not staged: {e:?}");
    let e = n
        .node_get_volume_stats(csi::NodeGetVolumeStatsRequest {
            volume_id: "pvc-xfs".into(),
            volume_path: dir.path().join("nowhere").display().to_string(),
            staging_target_path: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::NotFound, "{e:?}");
    // Controller publish errors.
    let mut ctl = c.controller();
    for (req, code) in [
        (
            csi::ControllerPublishVolumeRequest {
                volume_id: "pvc-xfs".into(),
                volume_capability: Some(xfs.clone()),
                ..Default::default()
            },
            Code::InvalidArgument,
        ),
        (
            csi::ControllerPublishVolumeRequest {
                volume_id: "pvc-xfs".into(),
                node_id: "node-1".into(),
                ..Default::default()
            },
            Code::InvalidArgument,
        ),
        (
            csi::ControllerPublishVolumeRequest {
                volume_id: "pvc-none".into(),
                node_id: "node-1".into(),
                volume_capability: Some(xfs.clone()),
                ..Default::default()
            },
            Code::NotFound,
        ),
        (
            csi::ControllerPublishVolumeRequest {
                volume_id: "pvc-xfs".into(),
                node_id: "node-9".into(),
                volume_capability: Some(xfs.clone()),
                ..Default::default()
            },
            Code::NotFound,
        ),
    ] {
        let e = ctl.controller_publish_volume(req).await.unwrap_err();
        assert_eq!(e.code(), code, "{e:?}");
    }
    assert!(
        c.record("pvc-xfs").await["published_node"].is_null(),
        "refusals change nothing"
    );

    // A node that takes one volume at a time refuses a second one.
    c.add_node_with(dir.path(), 3, "z1", 10, &["--max-volumes", "1"])
        .await;
    let info = c
        .node(3)
        .await
        .node_get_info(csi::NodeGetInfoRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(info.max_volumes_per_node, 1);
    publish(&c, "pvc-xfs", 3, &xfs).await;
    let e = ctl
        .controller_publish_volume(csi::ControllerPublishVolumeRequest {
            volume_id: "pvc-block".into(),
            node_id: "node-3".into(),
            volume_capability: Some(cap(None)),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::ResourceExhausted, "{e:?}");
    assert!(c.record("pvc-block").await["published_node"].is_null());
    ctl.controller_unpublish_volume(csi::ControllerUnpublishVolumeRequest {
        volume_id: "pvc-xfs".into(),
        node_id: "node-3".into(),
        secrets: Default::default(),
    })
    .await
    .unwrap();

    // xfs: made on the blank device, mounted, written, remounted intact.
    let ctx = publish(&c, "pvc-xfs", 1, &xfs).await.publish_context;
    stage(&c, "pvc-xfs", 1, &p, &xfs, &ctx).await.unwrap();
    assert_eq!(findmnt(&p.staging).unwrap().0, "xfs");
    node_publish(&c, "pvc-xfs", 1, &p, &p.target, &xfs, false)
        .await
        .unwrap();
    // A single-writer capability allows one publication: a second target
    // is refused and nothing is mounted or made there; the same target
    // again is fine.
    let mut one_writer = xfs.clone();
    one_writer.access_mode = Some(AccessMode {
        mode: Mode::SingleNodeSingleWriter as i32,
    });
    let other = p.target.with_file_name("other");
    let e = node_publish(&c, "pvc-xfs", 1, &p, &other, &one_writer, false)
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
    assert!(
        e.message().contains(&p.target.display().to_string()),
        "{e:?}"
    );
    assert!(!other.exists(), "a refused publication made its target");
    node_publish(&c, "pvc-xfs", 1, &p, &p.target, &one_writer, false)
        .await
        .unwrap();
    // A path that is not absolute names no publication: NOT_FOUND, for a
    // known volume and an unknown one alike.
    for vol in ["pvc-xfs", "pvc-none"] {
        let e = n
            .node_get_volume_stats(csi::NodeGetVolumeStatsRequest {
                volume_id: vol.into(),
                volume_path: "some/path".into(),
                staging_target_path: String::new(),
            })
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::NotFound, "{vol}: {e:?}");
        let e = n
            .node_expand_volume(csi::NodeExpandVolumeRequest {
                volume_id: vol.into(),
                volume_path: "some/path".into(),
                ..Default::default()
            })
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::NotFound, "{vol}: {e:?}");
    }
    let data = pattern(3, 5 * MIB as usize);
    write_file(&p.target.join("f"), &data);
    tear_down(&c, "pvc-xfs", 1, &p, &[&p.target]).await;
    let ctx = publish(&c, "pvc-xfs", 1, &xfs).await.publish_context;
    stage(&c, "pvc-xfs", 1, &p, &xfs, &ctx).await.unwrap();
    node_publish(&c, "pvc-xfs", 1, &p, &p.target, &xfs, false)
        .await
        .unwrap();
    assert_eq!(std::fs::read(p.target.join("f")).unwrap(), data);
    tear_down(&c, "pvc-xfs", 1, &p, &[&p.target]).await;

    // Raw block: the device node itself appears at the target path.
    let block = cap(None);
    let pb = paths(dir.path(), "pvc-block", 0);
    let ctx = publish(&c, "pvc-block", 0, &block).await.publish_context;
    stage(&c, "pvc-block", 0, &pb, &block, &ctx).await.unwrap();
    assert_eq!(
        findmnt(&pb.staging),
        None,
        "a block volume has no staging mount"
    );
    let dev = pb.target.with_file_name("dev");
    node_publish(&c, "pvc-block", 0, &pb, &dev, &block, false)
        .await
        .unwrap();
    node_publish(&c, "pvc-block", 0, &pb, &dev, &block, false)
        .await
        .unwrap();
    let mut one_writer = block.clone();
    one_writer.access_mode = Some(AccessMode {
        mode: Mode::SingleNodeSingleWriter as i32,
    });
    let other = dev.with_file_name("dev2");
    let e = node_publish(&c, "pvc-block", 0, &pb, &other, &one_writer, false)
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
    assert!(!other.exists(), "a refused publication made its target");
    // Kubelet binds a block target once more for the pod; publishing the
    // same target again is still the one publication.
    let pod = dev.with_file_name("pod-dev");
    std::fs::write(&pod, b"").unwrap();
    let bind = |args: &[&str]| {
        let st = Command::new(args[0]).args(&args[1..]).status().unwrap();
        assert!(st.success(), "{args:?}");
    };
    bind(&[
        "mount",
        "--bind",
        dev.to_str().unwrap(),
        pod.to_str().unwrap(),
    ]);
    node_publish(&c, "pvc-block", 0, &pb, &dev, &one_writer, false)
        .await
        .unwrap();
    bind(&["umount", pod.to_str().unwrap()]);
    {
        let mut f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_DIRECT)
            .open(&dev)
            .unwrap();
        assert_eq!(f.seek(SeekFrom::End(0)).unwrap(), 320 * MIB);
        // O_DIRECT wants an aligned buffer: carve one out of a larger Vec.
        let mut buf = vec![0u8; 2 * MIB as usize];
        let off = buf.as_ptr().align_offset(4096);
        let chunk = &mut buf[off..off + MIB as usize];
        chunk.copy_from_slice(&pattern(9, MIB as usize));
        f.seek(SeekFrom::Start(100 * MIB)).unwrap();
        f.write_all(chunk).unwrap();
        f.sync_all().unwrap();
        chunk.fill(0);
        f.seek(SeekFrom::Start(100 * MIB)).unwrap();
        f.read_exact(chunk).unwrap();
        assert_eq!(&*chunk, &pattern(9, MIB as usize)[..]);
    }
    let stats = c
        .node(0)
        .await
        .node_get_volume_stats(csi::NodeGetVolumeStatsRequest {
            volume_id: "pvc-block".into(),
            volume_path: dev.display().to_string(),
            staging_target_path: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(stats.usage[0].total, (320 * MIB) as i64);
    tear_down(&c, "pvc-block", 0, &pb, &[&dev]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dev_mode_serves_the_whole_driver_on_one_socket() {
    use shorthorn::csi::controller_client::ControllerClient;
    use shorthorn::csi::identity_client::IdentityClient;
    use shorthorn::csi::node_client::NodeClient;
    require_root();
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("csi.sock");
    let mut dev = super::cluster::Proc(
        Command::new(env!("CARGO_BIN_EXE_shorthorn"))
            .args(["dev", "--nodes", "2", "--max-volumes", "5", "--data-dir"])
            .arg(dir.path().join("data"))
            .arg("--csi-endpoint")
            .arg(format!("unix://{}", sock.display()))
            .stdout(std::process::Stdio::null())
            .spawn()
            .unwrap(),
    );
    let ch = super::cluster::csi::uds_channel(&sock).await;
    let (mut id, mut ctl, mut node) = (
        IdentityClient::new(ch.clone()),
        ControllerClient::new(ch.clone()),
        NodeClient::new(ch),
    );
    assert_eq!(
        id.get_plugin_info(csi::GetPluginInfoRequest {})
            .await
            .unwrap()
            .into_inner()
            .name,
        csi::DRIVER_NAME
    );
    let probe = id.probe(csi::ProbeRequest {}).await.unwrap().into_inner();
    assert_eq!(probe.ready, Some(true));
    let info = node
        .node_get_info(csi::NodeGetInfoRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(info.node_id, "dev-0");
    assert_eq!(info.max_volumes_per_node, 5, "dev --max-volumes");
    // Both nodes register before a two-replica volume can be placed.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    let vol = loop {
        match ctl
            .create_volume(create_req("pvc-dev", (64 * MIB) as i64, &[]))
            .await
        {
            Ok(r) => break r.into_inner().volume.unwrap(),
            Err(e)
                if e.code() == Code::ResourceExhausted && std::time::Instant::now() < deadline =>
            {
                tokio::time::sleep(std::time::Duration::from_millis(200)).await;
            }
            Err(e) => panic!("{e:?}"),
        }
    };
    assert_eq!(vol.volume_context["numberOfReplicas"], "2", "min(3, nodes)");

    // The bundled CLI drives the same socket: JSON answers, and a CSI
    // error becomes the exit status of its kind with the driver's message.
    let cli = |args: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_shorthorn"))
            .args(["csi", "--endpoint", &format!("unix://{}", sock.display())])
            .args(args)
            .output()
            .unwrap()
    };
    let out = cli(&[
        "create",
        "pvc-cli",
        "--size",
        "32Mi",
        "--param",
        "numberOfReplicas=1",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["capacity_bytes"], 32 * MIB);
    let out = cli(&["list"]);
    let listed: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(listed.as_array().unwrap().len(), 2);
    let out = cli(&["stage", "pvc-cli", "--staging-path", "/nonexistent/s"]);
    assert_eq!(out.status.code(), Some(2), "INVALID_ARGUMENT is exit 2");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("publish_context"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = cli(&[
        "create",
        "pvc-cli",
        "--size",
        "64Mi",
        "--param",
        "numberOfReplicas=1",
    ]);
    assert_eq!(out.status.code(), Some(4), "ALREADY_EXISTS is exit 4");
    // Snapshot, restore and list through the CLI (the volume is detached).
    let json = |out: std::process::Output| -> serde_json::Value {
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).unwrap()
    };
    let s = json(cli(&["snapshot", "snap-cli", "--volume", "pvc-cli"]));
    assert_eq!(
        (s["ready_to_use"].clone(), s["size_bytes"].clone()),
        (true.into(), (32 * MIB).into())
    );
    let sid = s["snapshot_id"].as_str().unwrap().to_owned();
    let r = json(cli(&["create", "pvc-cli-copy", "--from-snapshot", &sid]));
    assert_eq!(r["capacity_bytes"], 32 * MIB, "the snapshot's size");
    assert_eq!(r["content_source"]["snapshot_id"], sid.as_str());
    let listed = json(cli(&["snapshots", "--volume", "pvc-cli"]));
    assert_eq!(listed.as_array().unwrap().len(), 1);
    let out = cli(&["delete", "pvc-cli"]);
    assert_eq!(
        out.status.code(),
        Some(9),
        "FAILED_PRECONDITION: it has a snapshot"
    );
    json(cli(&["delete-snapshot", &sid]));
    assert!(cli(&["delete", "pvc-cli-copy"]).status.success());
    assert!(cli(&["delete", "pvc-cli"]).status.success());
    let ext4 = cap(Some("ext4"));
    let ctx = ctl
        .controller_publish_volume(csi::ControllerPublishVolumeRequest {
            volume_id: vol.volume_id.clone(),
            node_id: info.node_id.clone(),
            volume_capability: Some(ext4.clone()),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .publish_context;
    let p = paths(dir.path(), &vol.volume_id, 0);
    node.node_stage_volume(csi::NodeStageVolumeRequest {
        volume_id: vol.volume_id.clone(),
        publish_context: ctx,
        staging_target_path: p.staging.display().to_string(),
        volume_capability: Some(ext4.clone()),
        ..Default::default()
    })
    .await
    .unwrap();
    node.node_publish_volume(csi::NodePublishVolumeRequest {
        volume_id: vol.volume_id.clone(),
        staging_target_path: p.staging.display().to_string(),
        target_path: p.target.display().to_string(),
        volume_capability: Some(ext4),
        ..Default::default()
    })
    .await
    .unwrap();
    write_file(&p.target.join("hello"), b"hello from dev mode\n");
    assert_eq!(findmnt(&p.target).unwrap().0, "ext4");
    node.node_unpublish_volume(csi::NodeUnpublishVolumeRequest {
        volume_id: vol.volume_id.clone(),
        target_path: p.target.display().to_string(),
    })
    .await
    .unwrap();
    node.node_unstage_volume(csi::NodeUnstageVolumeRequest {
        volume_id: vol.volume_id.clone(),
        staging_target_path: p.staging.display().to_string(),
    })
    .await
    .unwrap();
    ctl.controller_unpublish_volume(csi::ControllerUnpublishVolumeRequest {
        volume_id: vol.volume_id.clone(),
        node_id: info.node_id,
        secrets: Default::default(),
    })
    .await
    .unwrap();
    ctl.delete_volume(csi::DeleteVolumeRequest {
        volume_id: vol.volume_id,
        secrets: Default::default(),
    })
    .await
    .unwrap();
    // SIGTERM stops the whole cluster cleanly, leaving no process behind.
    super::cluster::signal(&dev.0, nix::sys::signal::Signal::SIGTERM);
    let st = dev.0.wait().unwrap();
    assert!(st.success(), "dev exited with {st}");
    let data = dir.path().join("data").display().to_string();
    let left = Command::new("pgrep").args(["-f", &data]).output().unwrap();
    assert!(
        left.stdout.is_empty(),
        "left running: {}",
        String::from_utf8_lossy(&left.stdout)
    );
}

async fn expand(
    c: &Ctl,
    vol: &str,
    bytes: u64,
) -> Result<csi::ControllerExpandVolumeResponse, tonic::Status> {
    c.controller()
        .controller_expand_volume(csi::ControllerExpandVolumeRequest {
            volume_id: vol.into(),
            capacity_range: Some(csi::CapacityRange {
                required_bytes: bytes as i64,
                limit_bytes: 0,
            }),
            ..Default::default()
        })
        .await
        .map(tonic::Response::into_inner)
}

async fn node_expand(
    c: &Ctl,
    vol: &str,
    node: usize,
    path: &Path,
    bytes: u64,
) -> Result<i64, tonic::Status> {
    c.node(node)
        .await
        .node_expand_volume(csi::NodeExpandVolumeRequest {
            volume_id: vol.into(),
            volume_path: path.display().to_string(),
            capacity_range: Some(csi::CapacityRange {
                required_bytes: bytes as i64,
                limit_bytes: 0,
            }),
            ..Default::default()
        })
        .await
        .map(|r| r.into_inner().capacity_bytes)
}

/// Whether this process may grow a mounted ext4 (CAP_SYS_RESOURCE, bit
/// 24 of the effective set; the node plugin it starts has the same).
fn has_cap_sys_resource() -> bool {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let eff = status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .map(|v| u64::from_str_radix(v.trim(), 16).unwrap())
        .unwrap();
    eff >> 24 & 1 == 1
}

fn fs_bytes(path: &Path) -> u64 {
    let s = nix::sys::statvfs::statvfs(path).unwrap();
    s.blocks() * s.fragment_size()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn volumes_grow_online_and_offline_with_their_filesystems() {
    let dir = tempfile::tempdir().unwrap();
    let mut c = cluster(dir.path()).await;
    for (i, fs) in ["ext4", "xfs"].into_iter().enumerate() {
        let vol = format!("pvc-grow-{fs}");
        c.controller()
            .create_volume(create_req(&vol, (320 * MIB) as i64, &[]))
            .await
            .unwrap();
        let cap = cap(Some(fs));
        let ctx = publish(&c, &vol, i, &cap).await.publish_context;
        let p = paths(dir.path(), &vol, i);
        stage(&c, &vol, i, &p, &cap, &ctx).await.unwrap();
        node_publish(&c, &vol, i, &p, &p.target, &cap, false)
            .await
            .unwrap();
        let data = pattern(i as u8, 2 * MIB as usize);
        write_file(&p.target.join("keep"), &data);
        let before = fs_bytes(&p.target);

        // Online: the engine grows every replica; the node grows the
        // device and the mounted filesystem.
        let r = expand(&c, &vol, 640 * MIB).await.unwrap();
        assert_eq!(
            (r.capacity_bytes, r.node_expansion_required),
            ((640 * MIB) as i64, true)
        );
        assert_eq!(c.record(&vol).await["size"], 640 * MIB);
        let online = node_expand(&c, &vol, i, &p.target, 640 * MIB).await;
        // Growing a mounted ext4 takes CAP_SYS_RESOURCE (containers often
        // drop it); without it the node says so, and the filesystem grows
        // when the volume is next staged.
        if fs == "ext4" && !has_cap_sys_resource() {
            let e = online.unwrap_err();
            assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
            assert!(e.message().contains("CAP_SYS_RESOURCE"), "{e:?}");
            assert_eq!(fs_bytes(&p.target), before, "nothing changed");
            tear_down(&c, &vol, i, &p, &[&p.target]).await;
            let ctx = publish(&c, &vol, i, &cap).await.publish_context;
            stage(&c, &vol, i, &p, &cap, &ctx).await.unwrap();
            node_publish(&c, &vol, i, &p, &p.target, &cap, false)
                .await
                .unwrap();
        } else {
            assert_eq!(online.unwrap(), (640 * MIB) as i64);
        }
        let after = fs_bytes(&p.target);
        assert!(after > before + 250 * MIB, "{fs}: {before} -> {after}");
        assert_eq!(std::fs::read(p.target.join("keep")).unwrap(), data);
        // Repeating either call, or asking for less, changes nothing.
        assert_eq!(
            expand(&c, &vol, 400 * MIB).await.unwrap().capacity_bytes,
            (640 * MIB) as i64
        );
        assert_eq!(
            node_expand(&c, &vol, i, &p.target, 640 * MIB)
                .await
                .unwrap(),
            (640 * MIB) as i64
        );
        let big = data.len() as u64 + 400 * MIB;
        let mut f = std::fs::File::create(p.target.join("big")).unwrap();
        let chunk = pattern(1, MIB as usize);
        for _ in 0..(big / MIB) {
            f.write_all(&chunk).unwrap();
        }
        f.sync_all().unwrap();
        drop(f);
        std::fs::remove_file(p.target.join("big")).unwrap();
        tear_down(&c, &vol, i, &p, &[&p.target]).await;

        // Offline: the replicas grow where they rest; a replica process
        // restarted afterwards still opens; the filesystem grows at the
        // next stage.
        let r = expand(&c, &vol, 960 * MIB).await.unwrap();
        assert!(r.node_expansion_required);
        let node_of_r0 = c.record(&vol).await["replicas"][0]["node"]
            .as_str()
            .unwrap()
            .to_owned();
        let n: usize = node_of_r0.trim_start_matches("node-").parse().unwrap();
        let listed = instances(&c, n).await;
        let r0 = listed
            .iter()
            .find(|x| x.kind == "replica" && x.volume_id == vol)
            .unwrap()
            .clone();
        let killed = Command::new("pkill")
            .args(["-KILL", "-f", &format!("listen {}", r0.address)])
            .status()
            .unwrap();
        assert!(killed.success());
        wait_for(
            || std::net::TcpStream::connect(&r0.address).is_err(),
            "replica to die",
        );
        wait_for(
            || std::net::TcpStream::connect(&r0.address).is_ok(),
            "replica to restart at its grown size",
        );
        let ctx = publish(&c, &vol, i, &cap).await.publish_context;
        stage(&c, &vol, i, &p, &cap, &ctx).await.unwrap();
        node_publish(&c, &vol, i, &p, &p.target, &cap, false)
            .await
            .unwrap();
        assert_eq!(
            node_expand(&c, &vol, i, &p.target, 960 * MIB)
                .await
                .unwrap(),
            (960 * MIB) as i64
        );
        assert!(
            fs_bytes(&p.target) > 850 * MIB,
            "{fs}: {}",
            fs_bytes(&p.target)
        );
        assert_eq!(std::fs::read(p.target.join("keep")).unwrap(), data);
        let stats = c
            .node(i)
            .await
            .node_get_volume_stats(csi::NodeGetVolumeStatsRequest {
                volume_id: vol.clone(),
                volume_path: p.target.display().to_string(),
                staging_target_path: String::new(),
            })
            .await
            .unwrap()
            .into_inner();
        let cond = stats.volume_condition.unwrap();
        assert!(!cond.abnormal, "all three replicas serve: {cond:?}");
        tear_down(&c, &vol, i, &p, &[&p.target]).await;
    }

    // Bad requests change nothing.
    let e = c
        .controller()
        .controller_expand_volume(csi::ControllerExpandVolumeRequest {
            volume_id: "pvc-grow-ext4".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    assert_eq!(
        expand(&c, "pvc-none", GIB).await.unwrap_err().code(),
        Code::NotFound
    );
    let e = expand(&c, "pvc-grow-ext4", 100 * GIB).await.unwrap_err();
    assert_eq!(e.code(), Code::OutOfRange, "beyond the disks' room: {e:?}");
    assert_eq!(c.record("pvc-grow-ext4").await["size"], 960 * MIB);
    let e = node_expand(&c, "pvc-grow-ext4", 0, dir.path(), GIB)
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition, "not staged: {e:?}");
}

async fn delete_volume(c: &Ctl, vol: &str) -> Result<(), tonic::Status> {
    c.controller()
        .delete_volume(csi::DeleteVolumeRequest {
            volume_id: vol.into(),
            secrets: Default::default(),
        })
        .await
        .map(drop)
}

async fn snapshot(c: &Ctl, name: &str, vol: &str) -> Result<csi::Snapshot, tonic::Status> {
    c.controller()
        .create_snapshot(csi::CreateSnapshotRequest {
            source_volume_id: vol.into(),
            name: name.into(),
            ..Default::default()
        })
        .await
        .map(|r| r.into_inner().snapshot.unwrap())
}

async fn delete_snapshot(c: &Ctl, id: &str) -> Result<(), tonic::Status> {
    c.controller()
        .delete_snapshot(csi::DeleteSnapshotRequest {
            snapshot_id: id.into(),
            secrets: Default::default(),
        })
        .await
        .map(drop)
}

async fn list_snapshots(c: &Ctl, req: csi::ListSnapshotsRequest) -> (Vec<String>, String) {
    let r = c
        .controller()
        .list_snapshots(req)
        .await
        .unwrap()
        .into_inner();
    let ids = r
        .entries
        .into_iter()
        .map(|e| e.snapshot.unwrap().snapshot_id)
        .collect();
    (ids, r.next_token)
}

/// A CreateVolume of `bytes` (0: the source's size) made from `source`.
async fn create_from(
    c: &Ctl,
    name: &str,
    bytes: i64,
    limit: i64,
    source: csi::volume_content_source::Type,
) -> Result<csi::Volume, tonic::Status> {
    let mut req = create_req(name, bytes, &[]);
    req.capacity_range = Some(csi::CapacityRange {
        required_bytes: bytes,
        limit_bytes: limit,
    });
    req.volume_content_source = Some(csi::VolumeContentSource {
        r#type: Some(source),
    });
    c.controller()
        .create_volume(req)
        .await
        .map(|r| r.into_inner().volume.unwrap())
}

fn from_snapshot(id: &str) -> csi::volume_content_source::Type {
    csi::volume_content_source::Type::Snapshot(csi::volume_content_source::SnapshotSource {
        snapshot_id: id.into(),
    })
}

fn from_volume(id: &str) -> csi::volume_content_source::Type {
    csi::volume_content_source::Type::Volume(csi::volume_content_source::VolumeSource {
        volume_id: id.into(),
    })
}

/// Publishes, stages and node-publishes `vol` on `node`.
async fn mount_on(c: &Ctl, dir: &Path, vol: &str, node: usize, fs: &str) -> Paths {
    let cap = cap(Some(fs));
    let ctx = publish(c, vol, node, &cap).await.publish_context;
    let p = paths(dir, vol, node);
    stage(c, vol, node, &p, &cap, &ctx).await.unwrap();
    node_publish(c, vol, node, &p, &p.target, &cap, false)
        .await
        .unwrap();
    p
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshots_restore_and_clone_carry_files_into_new_volumes() {
    let dir = tempfile::tempdir().unwrap();
    let c = cluster(dir.path()).await;
    let src = "pvc-snap-src";
    c.controller()
        .create_volume(create_req(src, (256 * MIB) as i64, &[]))
        .await
        .unwrap();
    let pa = mount_on(&c, dir.path(), src, 0, "ext4").await;
    let (one, two) = (pattern(1, 3 * MIB as usize), pattern(2, MIB as usize));
    write_file(&pa.target.join("one"), &one);
    write_file(&pa.target.join("two"), &two);

    // Taken through the engine while the volume serves.
    let s1 = snapshot(&c, "snapshot-a1", src).await.unwrap();
    assert!(s1.ready_to_use);
    assert_eq!(
        (s1.size_bytes, s1.source_volume_id.as_str()),
        ((256 * MIB) as i64, src)
    );
    let again = snapshot(&c, "snapshot-a1", src).await.unwrap();
    assert_eq!(again, s1, "the same name twice is the same snapshot");
    let e = snapshot(&c, "snapshot-a1", "pvc-other").await.unwrap_err();
    assert_eq!(e.code(), Code::AlreadyExists, "{e:?}");
    let e = snapshot(&c, "", src).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    let e = snapshot(&c, "snapshot-x", "").await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    let e = snapshot(&c, "snapshot-x", "pvc-none").await.unwrap_err();
    assert_eq!(e.code(), Code::NotFound, "{e:?}");

    // The volume moves on after the snapshot.
    let three = pattern(3, 2 * MIB as usize);
    write_file(&pa.target.join("one"), &three);
    std::fs::remove_file(pa.target.join("two")).unwrap();
    write_file(&pa.target.join("three"), &three);

    // Restore into a larger volume: the snapshot's files, and a
    // filesystem grown to the new size when staged.
    let e = create_from(
        &c,
        "pvc-small",
        0,
        (128 * MIB) as i64,
        from_snapshot(&s1.snapshot_id),
    )
    .await
    .unwrap_err();
    assert_eq!(e.code(), Code::OutOfRange, "{e:?}");
    let e = create_from(&c, "pvc-lost", 0, 0, from_snapshot("snapshot-none"))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::NotFound, "{e:?}");
    let e = create_from(&c, "pvc-lost", 0, 0, from_volume("pvc-none"))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::NotFound, "{e:?}");
    let restored = "pvc-restored";
    let v = create_from(
        &c,
        restored,
        (512 * MIB) as i64,
        0,
        from_snapshot(&s1.snapshot_id),
    )
    .await
    .unwrap();
    assert_eq!(v.capacity_bytes, (512 * MIB) as i64);
    assert_eq!(
        v.content_source.unwrap().r#type,
        Some(from_snapshot(&s1.snapshot_id))
    );
    assert_eq!(
        create_from(
            &c,
            restored,
            (512 * MIB) as i64,
            0,
            from_snapshot(&s1.snapshot_id)
        )
        .await
        .unwrap()
        .volume_id,
        v.volume_id,
        "idempotent"
    );
    let e = create_from(&c, restored, (512 * MIB) as i64, 0, from_volume(src))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::AlreadyExists, "another source: {e:?}");
    assert_eq!(c.replica_dirs(restored).len(), 3);
    let pb = mount_on(&c, dir.path(), restored, 1, "ext4").await;
    assert_eq!(std::fs::read(pb.target.join("one")).unwrap(), one);
    assert_eq!(std::fs::read(pb.target.join("two")).unwrap(), two);
    assert!(!pb.target.join("three").exists());
    assert!(fs_bytes(&pb.target) > 400 * MIB, "{}", fs_bytes(&pb.target));

    // Clone the live source: its files as they are now.
    let cloned = "pvc-cloned";
    let v = create_from(&c, cloned, 0, 0, from_volume(src))
        .await
        .unwrap();
    assert_eq!(v.capacity_bytes, (256 * MIB) as i64);
    let pc = mount_on(&c, dir.path(), cloned, 2, "ext4").await;
    assert_eq!(std::fs::read(pc.target.join("one")).unwrap(), three);
    assert_eq!(std::fs::read(pc.target.join("three")).unwrap(), three);
    assert!(!pc.target.join("two").exists());
    // Volumes made from others are independent: writes stay apart.
    write_file(&pc.target.join("one"), &two);
    assert_eq!(std::fs::read(pa.target.join("one")).unwrap(), three);
    assert_eq!(std::fs::read(pb.target.join("one")).unwrap(), one);
    // The clone's transient snapshot is gone from the source's replicas.
    for d in c.replica_dirs(src) {
        for e in std::fs::read_dir(&d).unwrap() {
            let n = e.unwrap().file_name().to_string_lossy().into_owned();
            assert!(!n.contains("clone."), "{} left in {}", n, d.display());
        }
    }

    // Detached: a snapshot is taken on each resting replica.
    tear_down(&c, src, 0, &pa, &[&pa.target]).await;
    let e = delete_volume(&c, src).await.unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition, "has snapshots: {e:?}");
    let s2 = snapshot(&c, "snapshot-a2", src).await.unwrap();
    let (all, next) = list_snapshots(
        &c,
        csi::ListSnapshotsRequest {
            source_volume_id: src.into(),
            ..Default::default()
        },
    )
    .await;
    assert_eq!(
        (all.clone(), next),
        (
            vec![s1.snapshot_id.clone(), s2.snapshot_id.clone()],
            String::new()
        )
    );
    let (first, next) = list_snapshots(
        &c,
        csi::ListSnapshotsRequest {
            max_entries: 1,
            ..Default::default()
        },
    )
    .await;
    let (rest, last) = list_snapshots(
        &c,
        csi::ListSnapshotsRequest {
            starting_token: next,
            ..Default::default()
        },
    )
    .await;
    assert_eq!(([first, rest].concat(), last), (all, String::new()));
    let (one_id, _) = list_snapshots(
        &c,
        csi::ListSnapshotsRequest {
            snapshot_id: s2.snapshot_id.clone(),
            ..Default::default()
        },
    )
    .await;
    assert_eq!(one_id, vec![s2.snapshot_id.clone()]);
    let (none, _) = list_snapshots(
        &c,
        csi::ListSnapshotsRequest {
            snapshot_id: "snapshot-none".into(),
            ..Default::default()
        },
    )
    .await;
    assert!(none.is_empty());
    let again = "pvc-restored-2";
    create_from(&c, again, 0, 0, from_snapshot(&s2.snapshot_id))
        .await
        .unwrap();
    let pd = mount_on(&c, dir.path(), again, 0, "ext4").await;
    assert_eq!(std::fs::read(pd.target.join("three")).unwrap(), three);

    // Deleting a snapshot leaves what was restored from it.
    for _ in 0..2 {
        delete_snapshot(&c, &s1.snapshot_id).await.unwrap();
    }
    assert_eq!(std::fs::read(pb.target.join("two")).unwrap(), two);
    let e = delete_snapshot(&c, "").await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");

    for (vol, node, p) in [(restored, 1, &pb), (cloned, 2, &pc), (again, 0, &pd)] {
        tear_down(&c, vol, node, p, &[&p.target]).await;
    }

    // An xfs restore mounts beside its source, though both carry one UUID.
    let xsrc = "pvc-snap-xfs";
    let mut req = create_req(xsrc, (320 * MIB) as i64, &[]);
    req.volume_capabilities = vec![cap(Some("xfs"))];
    c.controller().create_volume(req).await.unwrap();
    let px = mount_on(&c, dir.path(), xsrc, 0, "xfs").await;
    write_file(&px.target.join("x"), &one);
    let sx = snapshot(&c, "snapshot-x1", xsrc).await.unwrap();
    let xcopy = "pvc-snap-xfs-copy";
    create_from(&c, xcopy, 0, 0, from_snapshot(&sx.snapshot_id))
        .await
        .unwrap();
    let py = mount_on(&c, dir.path(), xcopy, 0, "xfs").await;
    assert_eq!(std::fs::read(py.target.join("x")).unwrap(), one);
    tear_down(&c, xcopy, 0, &py, &[&py.target]).await;
    tear_down(&c, xsrc, 0, &px, &[&px.target]).await;
    delete_snapshot(&c, &sx.snapshot_id).await.unwrap();

    delete_snapshot(&c, &s2.snapshot_id).await.unwrap();
    for vol in [src, restored, cloned, again, xsrc, xcopy] {
        delete_volume(&c, vol).await.unwrap();
        assert!(c.replica_dirs(vol).is_empty(), "{vol}'s replicas remain");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_whose_rebuilds_keep_failing_is_replaced_on_another_node() {
    let dir = tempfile::tempdir().unwrap();
    let mut c = cluster(dir.path()).await;
    c.add_node(dir.path(), 3, "z1", 10).await;
    let vol = "pvc-flaky";
    let req = create_req(vol, (128 * MIB) as i64, &[("staleReplicaTimeout", "2s")]);
    c.controller().create_volume(req).await.unwrap();
    let rec = c.record(vol).await;
    let holders: Vec<usize> = replica_nodes(&rec);
    let (engine_node, victim) = (holders[0], holders[1]);
    let spare = (0..4).find(|n| !holders.contains(n)).unwrap();
    let p = mount_on(&c, dir.path(), vol, engine_node, "ext4").await;
    let keep = pattern(9, 4 * MIB as usize);
    write_file(&p.target.join("keep"), &keep);
    healthy(&mut c, vol, engine_node).await;

    // Every replica process the victim's node starts from now on dies at
    // its first write (its running one is adopted, unarmed, then killed):
    // the node answers, the replica comes back each time and is taken
    // back, and every rebuild fails. It must not be taken back forever.
    c.nodes[victim].restart_armed("write.data-written");
    c.nodes[victim].agent().await;
    let pattern_arg = format!("{}/replicas/{vol}-", c.nodes[victim].disk.display());
    let killed = Command::new("pkill")
        .args(["-KILL", "-f", &pattern_arg])
        .status()
        .unwrap();
    assert!(killed.success());
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(90);
    let mut n = 0u8;
    let mut most_rejoins = 0;
    let rec = loop {
        // Writes go on, so each rebuild reaches the replica's first write.
        n = n.wrapping_add(1);
        write_file(&p.target.join("during"), &pattern(n, 256 * 1024));
        let r = c.record(vol).await;
        let reps = r["replicas"].as_array().unwrap();
        let on = |node: usize| reps.iter().find(|x| x["node"] == format!("node-{node}"));
        if let Some(v) = on(victim) {
            most_rejoins = most_rejoins.max(v["rejoins"].as_u64().unwrap());
        }
        if on(spare).is_some() {
            assert!(on(victim).is_none(), "{r}");
            break r;
        }
        assert!(std::time::Instant::now() < deadline, "never replaced: {r}");
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    };
    assert_eq!(
        most_rejoins,
        u64::from(shorthorn::controller::model::MAX_REJOINS),
        "taken back as often as allowed, then left out: {rec}"
    );
    healthy(&mut c, vol, engine_node).await;
    assert_eq!(std::fs::read(p.target.join("keep")).unwrap(), keep);
    assert_eq!(
        std::fs::read(p.target.join("during")).unwrap(),
        pattern(n, 256 * 1024)
    );
    assert_replicas_identical(&c.record(vol).await).await;
    tear_down(&c, vol, engine_node, &p, &[&p.target]).await;
    delete_volume(&c, vol).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_away_past_its_stale_timeout_is_replaced_on_another_node() {
    let dir = tempfile::tempdir().unwrap();
    let mut c = cluster(dir.path()).await;
    c.add_node(dir.path(), 3, "z1", 10).await;
    // The roomiest node, in a zone of its own, is outside the volume's
    // topology: the replacement must not go there, although it would
    // spread the replicas wider.
    c.add_node(dir.path(), 4, "z9", 50).await;
    let vol = "pvc-stale";
    let mut req = create_req(vol, (128 * MIB) as i64, &[("staleReplicaTimeout", "2s")]);
    req.accessibility_requirements = Some(csi::TopologyRequirement {
        requisite: ["z1", "z2", "z3"]
            .iter()
            .map(|z| csi::Topology {
                segments: [("topology.kubernetes.io/zone".to_owned(), (*z).to_owned())].into(),
            })
            .collect(),
        preferred: Vec::new(),
    });
    c.controller().create_volume(req).await.unwrap();
    let rec = c.record(vol).await;
    let holders: Vec<usize> = replica_nodes(&rec);
    let (engine_node, victim) = (holders[0], holders[1]);
    assert!(!holders.contains(&4), "outside the topology: {rec}");
    let spare = (0..4).find(|n| !holders.contains(n)).unwrap();
    let p = mount_on(&c, dir.path(), vol, engine_node, "ext4").await;
    let keep = pattern(7, 4 * MIB as usize);
    write_file(&p.target.join("keep"), &keep);
    healthy(&mut c, vol, engine_node).await;

    // The victim's node goes down with its replica: the volume serves on,
    // degraded, and after the timeout a replica on the spare node takes
    // the lost one's place and is rebuilt.
    c.nodes[victim].kill_with_replicas();
    let during = pattern(8, 2 * MIB as usize);
    write_file(&p.target.join("during"), &during);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    let rec = loop {
        let r = c.record(vol).await;
        let nodes: Vec<String> = r["replicas"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x["node"].as_str().unwrap().to_owned())
            .collect();
        if nodes.contains(&format!("node-{spare}")) {
            break r;
        }
        assert!(std::time::Instant::now() < deadline, "never replaced: {r}");
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    };
    assert_eq!(rec["retired"][0]["node"], format!("node-{victim}"));
    healthy(&mut c, vol, engine_node).await;
    // The engine would restart over the current replicas, not the lost one.
    let record: serde_json::Value = serde_json::from_slice(
        &std::fs::read(
            c.nodes[engine_node]
                .state
                .join(format!("instances/engine.{vol}.engine.json")),
        )
        .unwrap(),
    )
    .unwrap();
    let args: Vec<&str> = record["args"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a.as_str().unwrap())
        .collect();
    let rec = c.record(vol).await;
    for r in rec["replicas"].as_array().unwrap() {
        assert!(args.contains(&r["address"].as_str().unwrap()), "{args:?}");
    }
    let lost = rec["retired"][0]["address"].as_str().unwrap();
    assert!(!args.contains(&lost), "{args:?}");
    assert_eq!(std::fs::read(p.target.join("keep")).unwrap(), keep);
    assert_eq!(std::fs::read(p.target.join("during")).unwrap(), during);
    // Every replica in the record, the new one included, holds the same
    // bytes.
    let rec = c.record(vol).await;
    assert_replicas_identical(&rec).await;

    // The victim's node comes back: its stale copy is deleted, not reused.
    c.nodes[victim].restart();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    loop {
        let r = c.record(vol).await;
        let left = c.nodes[victim].disk.join("replicas");
        let gone = std::fs::read_dir(&left).map_or(true, |mut d| d.next().is_none());
        if r["retired"].as_array().is_none_or(Vec::is_empty) && gone {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "never retired: {r}");
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
    tear_down(&c, vol, engine_node, &p, &[&p.target]).await;
    delete_volume(&c, vol).await.unwrap();
    assert!(c.replica_dirs(vol).is_empty());
}

async fn modify(c: &Ctl, vol: &str, params: &[(&str, &str)]) -> Result<(), tonic::Status> {
    c.controller()
        .controller_modify_volume(csi::ControllerModifyVolumeRequest {
            volume_id: vol.into(),
            secrets: Default::default(),
            mutable_parameters: params
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect(),
        })
        .await
        .map(drop)
}

/// The node numbers (`node-N`) holding `rec`'s replicas, in record order.
fn replica_nodes(rec: &serde_json::Value) -> Vec<usize> {
    rec["replicas"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["node"].as_str().unwrap()[5..].parse().unwrap())
        .collect()
}

/// Waits until `vol`'s record holds replicas on exactly `nodes` and no
/// retired ones, with its engine on `engine` serving them all read-write;
/// then checks every replica holds the same bytes.
async fn settle(c: &mut Ctl, vol: &str, engine: usize, nodes: impl Fn(&[usize]) -> bool) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    let rec = loop {
        let r = c.record(vol).await;
        let on: Vec<usize> = replica_nodes(&r);
        if nodes(&on) && r["retired"].as_array().is_none_or(Vec::is_empty) {
            break r;
        }
        assert!(std::time::Instant::now() < deadline, "never settled: {r}");
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    };
    healthy_with(c, vol, engine, rec["replicas"].as_array().unwrap().len()).await;
    // Read again: a replica placed but not yet created had no address in
    // the first read.
    assert_replicas_identical(&c.record(vol).await).await;
}

/// Every replica in volume record `rec` holds the same bytes.
async fn assert_replicas_identical(rec: &serde_json::Value) {
    let size = rec["size"].as_u64().unwrap();
    let mut sums = Vec::new();
    for r in rec["replicas"].as_array().unwrap() {
        let client = shorthorn::replica::client::Client::connect(r["address"].as_str().unwrap())
            .await
            .unwrap();
        sums.push(client.checksum(0, size).await.unwrap());
        client.shutdown();
    }
    assert!(!sums.is_empty(), "no replica: {rec}");
    assert!(sums.windows(2).all(|w| w[0] == w[1]), "{sums:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn modify_volume_changes_a_live_volumes_replica_count_and_locality() {
    let dir = tempfile::tempdir().unwrap();
    let mut c = cluster(dir.path()).await;
    c.add_node(dir.path(), 3, "z1", 10).await;
    let vol = "pvc-modify";
    c.controller()
        .create_volume(create_req(
            vol,
            (128 * MIB) as i64,
            &[("numberOfReplicas", "2")],
        ))
        .await
        .unwrap();
    let holders: Vec<usize> = replica_nodes(&c.record(vol).await);
    // The engine runs where no replica is.
    let engine = (0..4).find(|n| !holders.contains(n)).unwrap();
    let p = mount_on(&c, dir.path(), vol, engine, "ext4").await;
    let keep = pattern(9, 4 * MIB as usize);
    write_file(&p.target.join("keep"), &keep);

    // Bad requests change nothing.
    let e = modify(&c, vol, &[("fsType", "xfs")]).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    let e = modify(&c, vol, &[("numberOfReplicas", "0")])
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    let e = modify(&c, vol, &[("numberOfReplicas", "5")])
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::ResourceExhausted, "four nodes: {e:?}");
    let e = modify(&c, "pvc-none", &[("numberOfReplicas", "2")])
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::NotFound, "{e:?}");
    let e = modify(&c, "", &[]).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    assert_eq!(c.record(vol).await["params"]["replicas"], 2);

    // Best-effort locality: a copy is made on the engine's node, then the
    // surplus one elsewhere goes.
    modify(&c, vol, &[("dataLocality", "best-effort")])
        .await
        .unwrap();
    settle(&mut c, vol, engine, |on| {
        on.len() == 2 && on.contains(&engine)
    })
    .await;
    // More replicas: a third is added and rebuilt while the volume serves.
    modify(&c, vol, &[("numberOfReplicas", "3")]).await.unwrap();
    settle(&mut c, vol, engine, |on| {
        on.len() == 3 && on.contains(&engine)
    })
    .await;
    // Fewer: the local copy stays.
    modify(&c, vol, &[("numberOfReplicas", "1")]).await.unwrap();
    settle(&mut c, vol, engine, |on| on == [engine]).await;
    assert_eq!(std::fs::read(p.target.join("keep")).unwrap(), keep);
    write_file(&p.target.join("after"), &keep);
    tear_down(&c, vol, engine, &p, &[&p.target]).await;
    delete_volume(&c, vol).await.unwrap();
    assert!(c.replica_dirs(vol).is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restore_killed_mid_copy_is_finished_by_the_retry_never_served_half_done() {
    let dir = tempfile::tempdir().unwrap();
    let mut c = cluster(dir.path()).await;
    let src = "pvc-kill-src";
    c.controller()
        .create_volume(create_req(src, (256 * MIB) as i64, &[]))
        .await
        .unwrap();
    let p = mount_on(&c, dir.path(), src, 0, "ext4").await;
    let big = pattern(5, 16 * MIB as usize);
    write_file(&p.target.join("big"), &big);
    let s = snapshot(&c, "snapshot-k1", src).await.unwrap();
    tear_down(&c, src, 0, &p, &[&p.target]).await;

    // Node 1 dies (abort) right after copying its first chunk.
    c.nodes[1].restart_armed("copy.chunk-copied");
    c.nodes[1].agent().await;
    let copy = "pvc-kill-copy";
    let e = create_from(&c, copy, 0, 0, from_snapshot(&s.snapshot_id))
        .await
        .unwrap_err();
    // Not a final code: the CO keeps calling until the volume it began
    // is finished (or, its claim gone, finished and deleted).
    assert_eq!(e.code(), Code::Unavailable, "{e:?}");
    assert!(c.nodes[1].exited(), "node-1 did not reach the failpoint");
    // Half restored: still creating, so it cannot be published.
    let rec = c.record(copy).await;
    assert_eq!(rec["state"], "creating");
    let e = c
        .controller()
        .controller_publish_volume(csi::ControllerPublishVolumeRequest {
            volume_id: copy.into(),
            node_id: "node-2".into(),
            volume_capability: Some(cap(Some("ext4"))),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
    // The node comes back (adopting the half-filled replica), which
    // is flagged rebuilding: no engine would trust it.
    c.nodes[1].restart();
    c.nodes[1].agent().await;
    let target = instances(&c, 1)
        .await
        .into_iter()
        .find(|i| i.kind == "replica" && i.volume_id == copy)
        .unwrap();
    let t = shorthorn::replica::client::Client::connect(&target.address)
        .await
        .unwrap();
    assert!(t.info().await.unwrap().rebuilding);

    // The CO retries: the copy is finished, and the restored volume holds
    // the snapshot's file.
    create_from(&c, copy, 0, 0, from_snapshot(&s.snapshot_id))
        .await
        .unwrap();
    assert!(!t.info().await.unwrap().rebuilding);
    t.shutdown();
    let again = c.nodes[1]
        .agent()
        .await
        .restore_replica(shorthorn::api::agent::RestoreReplicaRequest {
            volume_id: copy.into(),
            replica_name: target.name.clone(),
            source_addresses: vec![rec_source(&mut c, src).await],
            snapshot: s.snapshot_id.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(again.copied_bytes, 0, "a finished restore copies nothing");
    let pc = mount_on(&c, dir.path(), copy, 2, "ext4").await;
    assert_eq!(std::fs::read(pc.target.join("big")).unwrap(), big);
    tear_down(&c, copy, 2, &pc, &[&pc.target]).await;
    delete_snapshot(&c, &s.snapshot_id).await.unwrap();

    // A clone cut off the same way holds its source: the source cannot
    // be deleted under it, and deleting the half-made clone instead
    // removes the transient snapshot it took on the source.
    c.nodes[1].restart_armed("copy.chunk-copied");
    c.nodes[1].agent().await;
    let clone = "pvc-kill-clone";
    create_from(&c, clone, 0, 0, from_volume(src))
        .await
        .unwrap_err();
    assert!(c.nodes[1].exited(), "node-1 did not reach the failpoint");
    c.nodes[1].restart();
    c.nodes[1].agent().await;
    let e = delete_volume(&c, src).await.unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
    assert!(e.message().contains(clone), "{e:?}");
    let transient = format!("clone.{clone}.");
    let has = |names: &[String]| names.iter().any(|n| n.starts_with(&transient));
    assert!(
        layer_names(&mut c, src).await.iter().all(|n| has(n)),
        "the clone's snapshot is on every source replica"
    );
    delete_volume(&c, clone).await.unwrap();
    assert!(c.replica_dirs(clone).is_empty());
    let left = layer_names(&mut c, src).await;
    assert!(
        left.iter().all(|n| !has(n)),
        "transient snapshot left: {left:?}"
    );

    for vol in [copy, src] {
        delete_volume(&c, vol).await.unwrap();
        assert!(c.replica_dirs(vol).is_empty());
    }
}

/// The layer names each replica of `vol` lists.
async fn layer_names(c: &mut Ctl, vol: &str) -> Vec<Vec<String>> {
    let mut names = Vec::new();
    for r in c.record(vol).await["replicas"].as_array().unwrap() {
        let client = shorthorn::replica::client::Client::connect(r["address"].as_str().unwrap())
            .await
            .unwrap();
        names.push(
            client
                .list()
                .await
                .unwrap()
                .into_iter()
                .map(|l| l.name)
                .collect(),
        );
        client.shutdown();
    }
    names
}

/// The address of one replica of `vol`.
async fn rec_source(c: &mut Ctl, vol: &str) -> String {
    c.record(vol).await["replicas"][0]["address"]
        .as_str()
        .unwrap()
        .to_owned()
}

/// A detached volume's snapshot is removed in two steps: marked removed on
/// every replica, then merged away. A DeleteSnapshot that cannot reach one
/// replica's node merges it away nowhere (the replicas' chains stay alike
/// for the next engine), and a retry once the node is back removes it from
/// every replica.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_detached_snapshot_deleted_with_a_node_down_is_removed_nowhere_until_a_retry() {
    let dir = tempfile::tempdir().unwrap();
    let mut c = cluster(dir.path()).await;
    let vol = "pvc-snap-detached";
    c.controller()
        .create_volume(create_req(vol, (64 * MIB) as i64, &[]))
        .await
        .unwrap();
    let s = snapshot(&c, "snapshot-detached", vol).await.unwrap();
    let layer = format!("volume-snap-{}.img", s.snapshot_id);
    let holding = |c: &Ctl| {
        c.replica_dirs(vol)
            .iter()
            .filter(|d| d.join(&layer).exists())
            .count()
    };
    assert_eq!(holding(&c), 3);
    let down = replica_nodes(&c.record(vol).await)[2];
    c.nodes[down].kill_with_replicas();
    let e = delete_snapshot(&c, &s.snapshot_id).await.unwrap_err();
    assert_eq!(e.code(), Code::Unavailable, "{e:?}");
    assert_eq!(
        holding(&c),
        3,
        "merged away on the replicas it reached: their chains now differ"
    );
    c.nodes[down].restart();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while let Err(e) = delete_snapshot(&c, &s.snapshot_id).await {
        assert!(std::time::Instant::now() < deadline, "never deleted: {e:?}");
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
    assert_eq!(holding(&c), 0);
    delete_volume(&c, vol).await.unwrap();
}
