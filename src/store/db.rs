//! [`Db`]: the [`Store`] in one redb file.
//!
//! Layout: table `objects` maps `(kind, key)` to `(version, bytes)`;
//! table `meta` holds `revision`, the version of the last commit. A commit
//! checks every condition and applies every write inside one redb write
//! transaction, whose commit is durable (fsynced, copy-on-write pages
//! with a checksummed root) before [`Store::commit`] returns.

use std::ops::Bound;
use std::path::{Path, PathBuf};

use redb::{Database, ReadableTable, TableDefinition};

use super::{Error, Expect, Kind, Op, Result, Store, Versioned};

const OBJECTS: TableDefinition<(u8, &str), (u64, &[u8])> = TableDefinition::new("objects");
const META: TableDefinition<&str, u64> = TableDefinition::new("meta");
const REVISION: &str = "revision";

/// The embedded store.
#[derive(Debug)]
pub struct Db {
    db: Database,
    path: PathBuf,
}

impl Db {
    /// Opens the database at `path`, creating it (and its tables) when
    /// missing. A file left by a killed process is recovered by redb to
    /// its last commit.
    pub fn open(path: &Path) -> Result<Self> {
        let fail = |e: &dyn std::fmt::Display| Error::Backend {
            path: path.display().to_string(),
            cause: e.to_string(),
        };
        let db = Database::create(path).map_err(|e| fail(&e))?;
        let tx = db.begin_write().map_err(|e| fail(&e))?;
        tx.open_table(OBJECTS).map_err(|e| fail(&e))?;
        tx.open_table(META).map_err(|e| fail(&e))?;
        tx.commit().map_err(|e| fail(&e))?;
        Ok(Self {
            db,
            path: path.to_owned(),
        })
    }

    fn fail(&self, e: impl std::fmt::Display) -> Error {
        Error::Backend {
            path: self.path.display().to_string(),
            cause: e.to_string(),
        }
    }
}

/// Whether `found` (the current version, `None` when absent) satisfies
/// `expect`.
fn holds(expect: Expect, found: Option<u64>) -> bool {
    match expect {
        Expect::Any => true,
        Expect::Absent => found.is_none(),
        Expect::Version(v) => found == Some(v),
    }
}

impl Store for Db {
    fn get(&self, kind: Kind, key: &str) -> Result<Option<Versioned<Vec<u8>>>> {
        let tx = self.db.begin_read().map_err(|e| self.fail(e))?;
        let t = tx.open_table(OBJECTS).map_err(|e| self.fail(e))?;
        let got = t.get((kind as u8, key)).map_err(|e| self.fail(e))?;
        Ok(got.map(|g| {
            let (version, bytes) = g.value();
            Versioned {
                version,
                value: bytes.to_vec(),
            }
        }))
    }

    fn list(
        &self,
        kind: Kind,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<(String, Versioned<Vec<u8>>)>> {
        let tx = self.db.begin_read().map_err(|e| self.fail(e))?;
        let t = tx.open_table(OBJECTS).map_err(|e| self.fail(e))?;
        let k = kind as u8;
        let start = match after {
            Some(a) => Bound::Excluded((k, a)),
            None => Bound::Included((k, "")),
        };
        let end = Bound::Excluded((k + 1, ""));
        let mut out = Vec::new();
        for entry in t
            .range::<(u8, &str)>((start, end))
            .map_err(|e| self.fail(e))?
        {
            if out.len() >= limit {
                break;
            }
            let (key, val) = entry.map_err(|e| self.fail(e))?;
            let (version, bytes) = val.value();
            out.push((
                key.value().1.to_owned(),
                Versioned {
                    version,
                    value: bytes.to_vec(),
                },
            ));
        }
        Ok(out)
    }

    fn commit(&self, ops: Vec<Op>) -> Result<u64> {
        let tx = self.db.begin_write().map_err(|e| self.fail(e))?;
        let revision = {
            let mut meta = tx.open_table(META).map_err(|e| self.fail(e))?;
            let mut t = tx.open_table(OBJECTS).map_err(|e| self.fail(e))?;
            let current = meta
                .get(REVISION)
                .map_err(|e| self.fail(e))?
                .map_or(0, |g| g.value());
            let revision = current + 1;
            for op in &ops {
                let (kind, key, expect) = match op {
                    Op::Put {
                        kind, key, expect, ..
                    }
                    | Op::Delete { kind, key, expect } => (*kind, key.as_str(), *expect),
                };
                let found = t
                    .get((kind as u8, key))
                    .map_err(|e| self.fail(e))?
                    .map(|g| g.value().0);
                if !holds(expect, found) {
                    // Dropping `tx` without committing aborts it.
                    return Err(Error::Conflict {
                        kind,
                        key: key.to_owned(),
                        expected: expect,
                        found,
                    });
                }
                match op {
                    Op::Put { value, .. } => {
                        t.insert((kind as u8, key), (revision, value.as_slice()))
                            .map_err(|e| self.fail(e))?;
                    }
                    Op::Delete { .. } => {
                        t.remove((kind as u8, key)).map_err(|e| self.fail(e))?;
                    }
                }
            }
            meta.insert(REVISION, revision).map_err(|e| self.fail(e))?;
            revision
        };
        crate::failpoint!("store.before-commit");
        tx.commit().map_err(|e| self.fail(e))?;
        Ok(revision)
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use proptest::prelude::*;

    use super::*;

    /// The plain model: a map and a revision counter, with the same
    /// all-or-nothing rule.
    #[derive(Default)]
    struct Model {
        map: BTreeMap<(u8, String), (u64, Vec<u8>)>,
        revision: u64,
    }

    impl Model {
        fn commit(&mut self, ops: &[Op]) -> Option<u64> {
            let mut next = self.map.clone();
            let rev = self.revision + 1;
            for op in ops {
                match op {
                    Op::Put {
                        kind,
                        key,
                        value,
                        expect,
                    } => {
                        let k = (*kind as u8, key.clone());
                        if !holds(*expect, next.get(&k).map(|v| v.0)) {
                            return None;
                        }
                        next.insert(k, (rev, value.clone()));
                    }
                    Op::Delete { kind, key, expect } => {
                        let k = (*kind as u8, key.clone());
                        if !holds(*expect, next.get(&k).map(|v| v.0)) {
                            return None;
                        }
                        next.remove(&k);
                    }
                }
            }
            self.map = next;
            self.revision = rev;
            Some(rev)
        }
    }

    fn kind() -> impl Strategy<Value = Kind> {
        prop_oneof![Just(Kind::Volume), Just(Kind::Node), Just(Kind::Name)]
    }

    fn expect() -> impl Strategy<Value = Expect> {
        prop_oneof![
            Just(Expect::Absent),
            Just(Expect::Any),
            (1u64..12).prop_map(Expect::Version)
        ]
    }

    fn op() -> impl Strategy<Value = Op> {
        let key = prop_oneof![Just(""), Just("a"), Just("ab"), Just("b"), Just("zz")]
            .prop_map(str::to_owned);
        prop_oneof![
            (
                kind(),
                key.clone(),
                prop::collection::vec(any::<u8>(), 0..8),
                expect()
            )
                .prop_map(|(kind, key, value, expect)| Op::Put {
                    kind,
                    key,
                    value,
                    expect
                }),
            (kind(), key, expect()).prop_map(|(kind, key, expect)| Op::Delete {
                kind,
                key,
                expect
            }),
        ]
    }

    fn check_same(db: &Db, m: &Model) {
        for kind in [Kind::Volume, Kind::Node, Kind::Name, Kind::Snapshot] {
            let got: Vec<_> = db
                .list(kind, None, usize::MAX)
                .unwrap()
                .into_iter()
                .map(|(k, v)| (k, v.version, v.value))
                .collect();
            let want: Vec<_> = m
                .map
                .iter()
                .filter(|((k, _), _)| *k == kind as u8)
                .map(|((_, key), (ver, val))| (key.clone(), *ver, val.clone()))
                .collect();
            assert_eq!(got, want, "{kind:?}");
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]
        /// Random transactions (many failing a condition) leave the store
        /// exactly like the model, also after reopening; failed ones change
        /// nothing, not even the revision.
        #[test]
        fn matches_the_model(txs in prop::collection::vec(prop::collection::vec(op(), 1..4), 1..24)) {
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("state.redb");
            let mut m = Model::default();
            {
                let db = Db::open(&path).unwrap();
                for ops in &txs {
                    let want = m.commit(ops);
                    match db.commit(ops.clone()) {
                        Ok(rev) => prop_assert_eq!(Some(rev), want),
                        Err(Error::Conflict { .. }) => prop_assert_eq!(None, want),
                        Err(e) => panic!("{e}"),
                    }
                }
                check_same(&db, &m);
            }
            check_same(&Db::open(&path).unwrap(), &m);
        }

        /// Paging with `after` and `limit` visits every key once, in order.
        #[test]
        fn pages_cover_every_key(keys in prop::collection::btree_set("[a-c]{0,3}", 0..20), limit in 1usize..5) {
            let dir = tempfile::tempdir().unwrap();
            let db = Db::open(&dir.path().join("s.redb")).unwrap();
            let ops = keys.iter().map(|k| Op::Put { kind: Kind::Snapshot, key: k.clone(), value: vec![1], expect: Expect::Absent }).collect::<Vec<_>>();
            if !ops.is_empty() {
                db.commit(ops).unwrap();
            }
            db.commit(vec![Op::Put { kind: Kind::Volume, key: "x".into(), value: vec![], expect: Expect::Any }]).unwrap();
            let mut seen = Vec::new();
            let mut after: Option<String> = None;
            loop {
                let page = db.list(Kind::Snapshot, after.as_deref(), limit).unwrap();
                prop_assert!(page.len() <= limit);
                if page.is_empty() {
                    break;
                }
                after = Some(page.last().unwrap().0.clone());
                seen.extend(page.into_iter().map(|(k, _)| k));
            }
            prop_assert_eq!(seen, keys.into_iter().collect::<Vec<_>>());
        }
    }
}
