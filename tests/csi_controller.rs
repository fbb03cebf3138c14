//! The CSI controller as a real process, driven through a CSI client
//! generated from the same proto over its unix socket (as the
//! external-provisioner connects), with nodes registered through the
//! manager API: identity, create/delete idempotency, scheduling, the
//! error codes the spec names, pagination, capacity, and state that
//! survives a SIGKILL.

#[path = "cluster/mod.rs"]
mod cluster;

use std::collections::BTreeSet;
use std::collections::HashMap;

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use cluster::csi::{connect, count_volumes, create_req, mount_cap, rwo, GIB};
use shorthorn::api::manager as mapi;
use shorthorn::csi;
use shorthorn::csi::identity_client::IdentityClient;
use tonic::transport::Channel;
use tonic::Code;

#[tokio::test]
async fn identity_reports_the_driver_and_readiness() {
    let dir = tempfile::tempdir().unwrap();
    let c = connect(dir.path()).await;
    let mut id = IdentityClient::new(c.csi.clone());
    let info = id
        .get_plugin_info(csi::GetPluginInfoRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(info.name, "driver.shorthorn.io");
    assert!(!info.vendor_version.is_empty());
    let caps = id
        .get_plugin_capabilities(csi::GetPluginCapabilitiesRequest {})
        .await
        .unwrap()
        .into_inner();
    assert!(!caps.capabilities.is_empty());
    let probe = id.probe(csi::ProbeRequest {}).await.unwrap().into_inner();
    assert_eq!(probe.ready, Some(true));
}

#[tokio::test]
async fn create_schedules_on_distinct_nodes_and_is_idempotent() {
    let dir = tempfile::tempdir().unwrap();
    let mut c = connect(dir.path()).await;
    c.add_three(dir.path(), 10).await;
    let mut ctl = c.controller();
    let v = ctl
        .create_volume(create_req("pvc-one", 100 * 1000 * 1000, &[]))
        .await
        .unwrap()
        .into_inner()
        .volume
        .unwrap();
    assert_eq!(v.volume_id, "pvc-one");
    // Rounded up to whole MiB.
    assert_eq!(v.capacity_bytes, 96 << 20);
    let rec = c.record("pvc-one").await;
    let nodes: BTreeSet<_> = rec["replicas"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["node"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(nodes.len(), 3, "three replicas on three nodes: {rec}");
    assert_eq!(rec["state"], "detached", "{rec}");
    // Each replica exists on its node's disk and its process serves.
    assert_eq!(c.replica_dirs("pvc-one").len(), 3);
    for r in rec["replicas"].as_array().unwrap() {
        let addr = r["address"].as_str().unwrap();
        let node = r["node"].as_str().unwrap();
        let i: u8 = node.trim_start_matches("node-").parse().unwrap();
        assert!(
            addr.starts_with(&format!("127.0.0.{}:", i + 2)),
            "{addr} on {node}"
        );
        tokio::net::TcpStream::connect(addr).await.unwrap();
    }

    // The same request again returns the same volume.
    let again = ctl
        .create_volume(create_req("pvc-one", 100 * 1000 * 1000, &[]))
        .await
        .unwrap()
        .into_inner()
        .volume
        .unwrap();
    assert_eq!(again, v);
    // Same name, a size the volume cannot satisfy: ALREADY_EXISTS.
    let e = ctl
        .create_volume(create_req("pvc-one", 2 * GIB as i64, &[]))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::AlreadyExists, "{e}");
    // Same name, other parameters: ALREADY_EXISTS.
    let e = ctl
        .create_volume(create_req("pvc-one", 100, &[("numberOfReplicas", "2")]))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::AlreadyExists, "{e}");

    // A name that is not a DNS label gets a derived id, stable on repeat.
    let odd = ctl
        .create_volume(create_req(
            "Odd Name/1",
            1 << 20,
            &[("numberOfReplicas", "1")],
        ))
        .await
        .unwrap()
        .into_inner()
        .volume
        .unwrap();
    assert!(odd.volume_id.starts_with("v-"), "{}", odd.volume_id);

    // Topology naming the node the caller runs on (what csi-sanity sends,
    // and one of the candidates the external-provisioner lists) says where
    // the volume is used, not where its replicas must be: three replicas
    // still go to three nodes. A zone confines them.
    let on = |segments: &[(&str, &str)]| csi::TopologyRequirement {
        requisite: vec![csi::Topology {
            segments: segments
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect(),
        }],
        preferred: Vec::new(),
    };
    let mut req = create_req("pvc-here", 1 << 20, &[]);
    req.accessibility_requirements = Some(on(&[("shorthorn.io/node", "node-0")]));
    ctl.create_volume(req).await.unwrap();
    let rec = c.record("pvc-here").await;
    assert_eq!(rec["replicas"].as_array().unwrap().len(), 3, "{rec}");
    let mut req = create_req("pvc-zoned", 1 << 20, &[]);
    req.accessibility_requirements = Some(on(&[
        ("shorthorn.io/node", "node-0"),
        ("topology.kubernetes.io/zone", "z1"),
    ]));
    let e = ctl.create_volume(req).await.unwrap_err();
    assert_eq!(e.code(), Code::ResourceExhausted, "{e}");
    let mut req = create_req("pvc-zoned", 1 << 20, &[("numberOfReplicas", "1")]);
    req.accessibility_requirements = Some(on(&[("topology.kubernetes.io/zone", "z2")]));
    ctl.create_volume(req).await.unwrap();
    let rec = c.record("pvc-zoned").await;
    assert_eq!(
        rec["replicas"][0]["node"], "node-1",
        "z2 is node-1's: {rec}"
    );
    // Preferred alone is a wish: one replica goes where it asks, three
    // go to three nodes although z1 has one, and the volume is not held
    // to z1 afterwards.
    let prefer = |zone: &str| csi::TopologyRequirement {
        requisite: Vec::new(),
        preferred: on(&[("topology.kubernetes.io/zone", zone)]).requisite,
    };
    let mut req = create_req("pvc-prefers", 1 << 20, &[("numberOfReplicas", "1")]);
    req.accessibility_requirements = Some(prefer("z3"));
    ctl.create_volume(req).await.unwrap();
    let rec = c.record("pvc-prefers").await;
    assert_eq!(
        rec["replicas"][0]["node"], "node-2",
        "z3 is node-2's: {rec}"
    );
    let mut req = create_req("pvc-prefers-3", 1 << 20, &[]);
    req.accessibility_requirements = Some(prefer("z1"));
    ctl.create_volume(req).await.unwrap();
    let rec = c.record("pvc-prefers-3").await;
    assert_eq!(rec["replicas"].as_array().unwrap().len(), 3, "{rec}");
    assert!(
        rec["topology"].as_array().is_none_or(Vec::is_empty),
        "{rec}"
    );

    // Delete is idempotent, and the name is free again afterwards.
    for _ in 0..2 {
        ctl.delete_volume(csi::DeleteVolumeRequest {
            volume_id: "pvc-one".into(),
            secrets: HashMap::new(),
        })
        .await
        .unwrap();
    }
    let e = ctl
        .controller_get_volume(csi::ControllerGetVolumeRequest {
            volume_id: "pvc-one".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::NotFound);
    assert!(
        c.replica_dirs("pvc-one").is_empty(),
        "replica directories gone"
    );
    ctl.create_volume(create_req("pvc-one", 2 * GIB as i64, &[]))
        .await
        .unwrap();
}

#[tokio::test]
async fn bad_requests_get_the_spec_codes_and_change_nothing() {
    use csi::volume_capability::access_mode::Mode;
    let dir = tempfile::tempdir().unwrap();
    let mut c = connect(dir.path()).await;
    c.add_three(dir.path(), 1).await;
    let mut ctl = c.controller();
    let no_caps = csi::CreateVolumeRequest {
        volume_capabilities: vec![],
        ..create_req("pvc-x", 1 << 20, &[])
    };
    let multi = csi::CreateVolumeRequest {
        volume_capabilities: vec![mount_cap(Mode::MultiNodeMultiWriter)],
        ..create_req("pvc-x", 1 << 20, &[])
    };
    let btrfs = csi::CreateVolumeRequest {
        volume_capabilities: vec![csi::VolumeCapability {
            access_type: Some(csi::volume_capability::AccessType::Mount(
                csi::volume_capability::MountVolume {
                    fs_type: "btrfs".into(),
                    ..Default::default()
                },
            )),
            ..rwo()
        }],
        ..create_req("pvc-x", 1 << 20, &[])
    };
    let inverted = csi::CreateVolumeRequest {
        capacity_range: Some(csi::CapacityRange {
            required_bytes: 10 << 20,
            limit_bytes: 5 << 20,
        }),
        ..create_req("pvc-x", 0, &[])
    };
    let unaligned_limit = csi::CreateVolumeRequest {
        capacity_range: Some(csi::CapacityRange {
            required_bytes: (1 << 20) + 1,
            limit_bytes: (1 << 20) + 1,
        }),
        ..create_req("pvc-x", 0, &[])
    };
    let cases = [
        (create_req("", 1 << 20, &[]), Code::InvalidArgument),
        (no_caps, Code::InvalidArgument),
        (multi, Code::InvalidArgument),
        (btrfs, Code::InvalidArgument),
        (
            create_req("pvc-x", 1 << 20, &[("numberOfReplicas", "zero")]),
            Code::InvalidArgument,
        ),
        (
            create_req("pvc-x", 1 << 20, &[("colour", "blue")]),
            Code::InvalidArgument,
        ),
        (inverted, Code::OutOfRange),
        (unaligned_limit, Code::OutOfRange),
        // Four replicas need four nodes; three are registered.
        (
            create_req("pvc-x", 1 << 20, &[("numberOfReplicas", "4")]),
            Code::ResourceExhausted,
        ),
        // 3 GiB does not fit 1 GiB disks even with 200 % over-provisioning.
        (
            create_req("pvc-x", 3 * GIB as i64, &[]),
            Code::ResourceExhausted,
        ),
        (
            create_req("pvc-x", 1 << 20, &[("diskSelector", "nvme")]),
            Code::ResourceExhausted,
        ),
    ];
    for (req, code) in cases {
        let what = format!("{:?} {:?}", req.name, req.parameters);
        let e = ctl.create_volume(req).await.unwrap_err();
        assert_eq!(e.code(), code, "{what}: {e}");
        assert!(!e.message().is_empty());
    }
    assert_eq!(
        count_volumes(&c).await,
        0,
        "a refused request created nothing"
    );

    let e = ctl
        .delete_volume(csi::DeleteVolumeRequest::default())
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    // Deleting a volume that never existed succeeds.
    ctl.delete_volume(csi::DeleteVolumeRequest {
        volume_id: "pvc-never".into(),
        secrets: HashMap::new(),
    })
    .await
    .unwrap();

    let validate =
        |id: &str, caps: Vec<csi::VolumeCapability>| csi::ValidateVolumeCapabilitiesRequest {
            volume_id: id.into(),
            volume_capabilities: caps,
            ..Default::default()
        };
    let e = ctl
        .validate_volume_capabilities(validate("pvc-never", vec![rwo()]))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::NotFound);
    let e = ctl
        .validate_volume_capabilities(validate("", vec![rwo()]))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    ctl.create_volume(create_req("pvc-v", 1 << 20, &[]))
        .await
        .unwrap();
    let e = ctl
        .validate_volume_capabilities(validate("pvc-v", vec![]))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    let ok = ctl
        .validate_volume_capabilities(validate("pvc-v", vec![rwo()]))
        .await
        .unwrap()
        .into_inner();
    assert!(ok.confirmed.is_some());
    let no = ctl
        .validate_volume_capabilities(validate(
            "pvc-v",
            vec![mount_cap(Mode::MultiNodeMultiWriter)],
        ))
        .await
        .unwrap()
        .into_inner();
    assert!(
        no.confirmed.is_none() && no.message.contains("one node"),
        "{no:?}"
    );

    let e = c
        .manager
        .register_node(mapi::RegisterNodeRequest {
            node_id: "n".into(),
            agent_address: "127.0.0.1:1".into(),
            disks: vec![mapi::Disk {
                path: "relative".into(),
                capacity_bytes: 1,
                tags: vec![],
            }],
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
}

#[tokio::test]
async fn list_pages_capacity_and_state_that_survives_a_kill() {
    let dir = tempfile::tempdir().unwrap();
    let mut c = connect(dir.path()).await;
    c.add_three(dir.path(), 10).await;
    let mut ctl = c.controller();
    // 3 nodes x 10 GiB x 200 % over-provisioning.
    let cap = |params: &[(&str, &str)]| csi::GetCapacityRequest {
        parameters: params
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect(),
        ..Default::default()
    };
    let before = ctl.get_capacity(cap(&[])).await.unwrap().into_inner();
    assert_eq!(before.available_capacity, 20 * GIB as i64);
    let mut ids = Vec::new();
    for i in 0..5 {
        let v = ctl
            .create_volume(create_req(&format!("pvc-{i}"), GIB as i64, &[]))
            .await
            .unwrap()
            .into_inner()
            .volume
            .unwrap();
        ids.push(v.volume_id);
    }
    let after = ctl.get_capacity(cap(&[])).await.unwrap().into_inner();
    assert_eq!(after.available_capacity, 15 * GIB as i64);
    let four = ctl
        .get_capacity(cap(&[("numberOfReplicas", "4")]))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        four.available_capacity, 0,
        "four replicas cannot be placed on three nodes"
    );

    // Pages of two cover every volume once.
    let mut seen = Vec::new();
    let mut token = String::new();
    loop {
        let page = ctl
            .list_volumes(csi::ListVolumesRequest {
                max_entries: 2,
                starting_token: token.clone(),
            })
            .await
            .unwrap()
            .into_inner();
        assert!(page.entries.len() <= 2);
        seen.extend(
            page.entries
                .iter()
                .map(|e| e.volume.as_ref().unwrap().volume_id.clone()),
        );
        if page.next_token.is_empty() {
            break;
        }
        token = page.next_token;
    }
    assert_eq!(seen, ids);
    let e = ctl
        .list_volumes(csi::ListVolumesRequest {
            max_entries: 0,
            starting_token: "bogus".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Aborted);
    let e = ctl
        .list_volumes(csi::ListVolumesRequest {
            max_entries: -1,
            starting_token: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);

    // SIGKILL the controller: every acknowledged volume is there after a
    // restart, and a repeated create still finds its volume.
    drop(ctl);
    drop(c);
    let c = connect(dir.path()).await;
    assert_eq!(count_volumes(&c).await, 5);
    let mut ctl = c.controller();
    let v = ctl
        .create_volume(create_req("pvc-3", GIB as i64, &[]))
        .await
        .unwrap()
        .into_inner()
        .volume
        .unwrap();
    assert_eq!(v.volume_id, "pvc-3");
    assert_eq!(count_volumes(&c).await, 5);
}

#[tokio::test]
async fn the_node_agent_creates_idempotently_and_refuses_bad_requests() {
    use shorthorn::api::agent;
    let dir = tempfile::tempdir().unwrap();
    let mut c = connect(dir.path()).await;
    c.add_node(dir.path(), 0, "z1", 10).await;
    let nodes = c
        .manager
        .list_nodes(mapi::ListNodesRequest {})
        .await
        .unwrap()
        .into_inner()
        .nodes_json;
    let rec: serde_json::Value = serde_json::from_str(&nodes[0]).unwrap();
    assert_eq!(
        rec["disks"][0]["capacity"],
        10 * GIB,
        "the =SIZE cap is reported"
    );
    let addr = rec["agent_address"].as_str().unwrap();
    let ch = Channel::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut a = agent::agent_client::AgentClient::new(ch);
    let disk = c.nodes[0].disk.display().to_string();
    let req = |vol: &str, name: &str, disk: &str, size: u64| agent::CreateReplicaRequest {
        volume_id: vol.into(),
        replica_name: name.into(),
        disk_path: disk.into(),
        size_bytes: size,
    };
    let first = a
        .create_replica(req("vol-a", "r0", &disk, 1 << 20))
        .await
        .unwrap()
        .into_inner();
    let again = a
        .create_replica(req("vol-a", "r0", &disk, 1 << 20))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        first.address, again.address,
        "a repeated create finds the running replica"
    );
    for (r, code) in [
        (req("vol-a", "r0", &disk, 2 << 20), Code::AlreadyExists),
        (req("../etc", "r0", &disk, 1 << 20), Code::InvalidArgument),
        (req("vol-a", "R0", &disk, 1 << 20), Code::InvalidArgument),
        (req("vol-a", "r1", "/elsewhere", 1 << 20), Code::NotFound),
        (req("vol-a", "r1", &disk, 1000), Code::InvalidArgument),
    ] {
        let e = a.create_replica(r).await.unwrap_err();
        assert_eq!(e.code(), code, "{e}");
    }
    // A replica process that dies is restarted on the same address.
    let listed = a
        .list_instances(agent::ListInstancesRequest {})
        .await
        .unwrap()
        .into_inner()
        .instances;
    assert_eq!(listed.len(), 1);
    assert!(listed[0].running);
    let out = Command::new("pkill")
        .args(["-KILL", "-f", &format!("replica --dir {}", listed[0].path)])
        .status()
        .unwrap();
    assert!(out.success(), "the replica process was found and killed");
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        tokio::time::sleep(Duration::from_millis(100)).await;
        if tokio::net::TcpStream::connect(&first.address).await.is_ok() {
            let l = a
                .list_instances(agent::ListInstancesRequest {})
                .await
                .unwrap()
                .into_inner()
                .instances;
            if l[0].running {
                break;
            }
        }
        assert!(Instant::now() < deadline, "the replica was not restarted");
    }
    let del = || agent::DeleteReplicaRequest {
        volume_id: "vol-a".into(),
        replica_name: "r0".into(),
        disk_path: disk.clone(),
    };
    a.delete_replica(del()).await.unwrap();
    a.delete_replica(del()).await.unwrap();
    assert!(!Path::new(&listed[0].path).exists());
}
