//! What an operator graphs and alerts on, per volume and per replica:
//! request counts, bytes, errors and latency histograms, and the replica
//! set's state. Rendered in the Prometheus text format by [`Metrics::encode`].
//!
//! Handles to each series are created once (per volume at open, per replica
//! when it joins), so the I/O path only increments atomics and observes a
//! histogram.

use std::time::Duration;

use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

use super::volume::{Health, Mode, VolumeStatus};

fn gauge(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

/// The request kinds counted.
#[derive(Debug, Clone, Copy, Hash, PartialEq, Eq, EncodeLabelValue)]
#[allow(non_camel_case_types)] // label values as Prometheus users spell them
pub enum Op {
    /// Read.
    read,
    /// Write.
    write,
    /// Unmap (trim).
    unmap,
    /// Flush.
    flush,
    /// Write-intent mark (replicas only): a durable metadata update before
    /// the first write to a region.
    intent,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct VolumeLabels {
    volume: String,
    op: Op,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReplicaLabels {
    volume: String,
    replica: String,
    op: Op,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StateLabels {
    volume: String,
    replica: String,
    mode: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReplicaLabel {
    volume: String,
    replica: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct NameLabel {
    volume: String,
}

fn new_histogram() -> Histogram {
    // 20 µs to about 10 s, doubling.
    Histogram::new(prometheus_client::metrics::histogram::exponential_buckets(
        20e-6, 2.0, 20,
    ))
}

/// Series handles for one request kind.
#[derive(Debug, Clone)]
pub struct OpHandles {
    requests: Counter,
    errors: Counter,
    bytes: Counter,
    seconds: Histogram,
}

impl OpHandles {
    /// Records one request.
    pub fn record(&self, bytes: u64, took: Duration, ok: bool) {
        self.requests.inc();
        self.bytes.inc_by(bytes);
        if !ok {
            self.errors.inc();
        }
        self.seconds.observe(took.as_secs_f64());
    }
}

/// Handles for one volume or replica, indexed by [`Op`].
#[derive(Debug, Clone)]
pub struct Handles([OpHandles; 5]);

impl Handles {
    /// The handles of `op`.
    pub fn op(&self, op: Op) -> &OpHandles {
        &self.0[op as usize]
    }
}

const OPS: [Op; 5] = [Op::read, Op::write, Op::unmap, Op::flush, Op::intent];

/// The four request series (requests, errors, bytes, latency) of one
/// subject, a volume or a replica, labelled by `L`.
#[derive(Debug)]
struct OpFamilies<L> {
    requests: Family<L, Counter>,
    errors: Family<L, Counter>,
    bytes: Family<L, Counter>,
    seconds: Family<L, Histogram, fn() -> Histogram>,
}

impl<L> OpFamilies<L>
where
    L: Clone + std::hash::Hash + Eq + EncodeLabelSet + std::fmt::Debug + Send + Sync + 'static,
{
    fn new() -> Self {
        Self {
            requests: Family::default(),
            errors: Family::default(),
            bytes: Family::default(),
            seconds: Family::new_with_constructor(new_histogram),
        }
    }

    /// Registers the series as `<subject>_requests` and so on.
    fn register(&self, registry: &mut Registry, subject: &str, what: &str) {
        registry.register(
            format!("{subject}_requests"),
            format!("Requests {what}"),
            self.requests.clone(),
        );
        registry.register(
            format!("{subject}_errors"),
            format!("Requests {what} that failed"),
            self.errors.clone(),
        );
        registry.register(
            format!("{subject}_bytes"),
            format!("Bytes of the requests {what}"),
            self.bytes.clone(),
        );
        registry.register(
            format!("{subject}_request_seconds"),
            format!("Latency of the requests {what}"),
            self.seconds.clone(),
        );
    }

    fn handles(&self, label: impl Fn(Op) -> L) -> Handles {
        Handles(OPS.map(|op| {
            let l = label(op);
            OpHandles {
                requests: self.requests.get_or_create(&l).clone(),
                errors: self.errors.get_or_create(&l).clone(),
                bytes: self.bytes.get_or_create(&l).clone(),
                seconds: self.seconds.get_or_create(&l).clone(),
            }
        }))
    }
}

/// The engine's metrics registry.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    volume: String,
    volume_ops: OpFamilies<VolumeLabels>,
    replica_ops: OpFamilies<ReplicaLabels>,
    replica_mode: Family<StateLabels, Gauge>,
    health: Family<NameLabel, Gauge>,
    size: Family<NameLabel, Gauge>,
    rebuild_done: Family<ReplicaLabel, Gauge>,
    rebuild_total: Family<ReplicaLabel, Gauge>,
}

impl Metrics {
    /// A registry for volume `volume`.
    pub fn new(volume: &str) -> Self {
        let mut m = Self {
            registry: Registry::with_prefix("shorthorn"),
            volume: volume.to_owned(),
            volume_ops: OpFamilies::new(),
            replica_ops: OpFamilies::new(),
            replica_mode: Family::default(),
            health: Family::default(),
            size: Family::default(),
            rebuild_done: Family::default(),
            rebuild_total: Family::default(),
        };
        let r = &mut m.registry;
        m.volume_ops.register(r, "volume", "the volume served");
        m.replica_ops.register(r, "replica", "sent to each replica");
        r.register(
            "replica_mode",
            "1 for the replica's current mode",
            m.replica_mode.clone(),
        );
        r.register(
            "volume_health",
            "0 healthy, 1 degraded, 2 faulted",
            m.health.clone(),
        );
        r.register("volume_size_bytes", "Volume size", m.size.clone());
        r.register(
            "replica_rebuild_done_bytes",
            "Bytes compared or copied by the replica's rebuild",
            m.rebuild_done.clone(),
        );
        r.register(
            "replica_rebuild_total_bytes",
            "Bytes the replica's rebuild has to go through",
            m.rebuild_total.clone(),
        );
        m
    }

    /// The volume's handles.
    pub fn volume_handles(&self) -> Handles {
        self.volume_ops.handles(|op| VolumeLabels {
            volume: self.volume.clone(),
            op,
        })
    }

    /// The handles of replica `addr`.
    pub fn replica_handles(&self, addr: &str) -> Handles {
        self.replica_ops.handles(|op| ReplicaLabels {
            volume: self.volume.clone(),
            replica: addr.to_owned(),
            op,
        })
    }

    /// Renders every series, with the state gauges taken from `st`.
    pub fn encode(&self, st: &VolumeStatus) -> String {
        let name = NameLabel {
            volume: self.volume.clone(),
        };
        self.health.get_or_create(&name).set(match st.health {
            Health::Healthy => 0,
            Health::Degraded => 1,
            Health::Faulted => 2,
        });
        self.size.get_or_create(&name).set(gauge(st.size));
        self.replica_mode.clear();
        for r in &st.replicas {
            for (mode, label) in [
                (Mode::ReadWrite, "read_write"),
                (Mode::WriteOnly, "write_only"),
                (Mode::Failed, "failed"),
            ] {
                let l = StateLabels {
                    volume: self.volume.clone(),
                    replica: r.addr.clone(),
                    mode: label,
                };
                self.replica_mode
                    .get_or_create(&l)
                    .set(i64::from(r.mode == mode));
            }
            if let Some(p) = &r.rebuild {
                let l = ReplicaLabel {
                    volume: self.volume.clone(),
                    replica: r.addr.clone(),
                };
                self.rebuild_done.get_or_create(&l).set(gauge(p.done_bytes));
                self.rebuild_total
                    .get_or_create(&l)
                    .set(gauge(p.total_bytes));
            }
        }
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry)
            .expect("writing to a String cannot fail");
        out
    }
}
