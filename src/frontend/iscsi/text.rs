//! Text keys (RFC 7143 §6 and §13): parsing and encoding `key=value` data
//! segments, and the target's side of operational parameter negotiation.
//! Pure: the login and text handlers feed it keys and send what it answers.

use std::collections::BTreeMap;

/// Why a text segment cannot be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TextError {
    /// A pair without `=`, or an empty key.
    #[error("malformed text pair {0:?}")]
    Malformed(String),
    /// Not UTF-8.
    #[error("text is not UTF-8")]
    NotUtf8,
    /// A key appears twice in one exchange (RFC 7143 §6.1: a protocol error).
    #[error("key {0} appears twice")]
    Duplicate(String),
}

/// Parses `key=value\0...` (a trailing NUL is optional on the last pair).
pub fn parse(data: &[u8]) -> Result<Vec<(String, String)>, TextError> {
    let mut out: Vec<(String, String)> = Vec::new();
    for raw in data.split(|&b| b == 0).filter(|p| !p.is_empty()) {
        let s = std::str::from_utf8(raw).map_err(|_| TextError::NotUtf8)?;
        let (k, v) = s
            .split_once('=')
            .filter(|(k, _)| !k.is_empty())
            .ok_or_else(|| TextError::Malformed(s.to_owned()))?;
        if out.iter().any(|(x, _)| x == k) {
            return Err(TextError::Duplicate(k.to_owned()));
        }
        out.push((k.to_owned(), v.to_owned()));
    }
    Ok(out)
}

/// Encodes pairs as `key=value\0...`.
pub fn encode<K: AsRef<str>, V: AsRef<str>>(pairs: &[(K, V)]) -> Vec<u8> {
    let mut out = Vec::new();
    for (k, v) in pairs {
        out.extend_from_slice(k.as_ref().as_bytes());
        out.push(b'=');
        out.extend_from_slice(v.as_ref().as_bytes());
        out.push(0);
    }
    out
}

/// What this target offers or accepts at most.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// The largest data segment this target receives.
    pub max_recv_data_segment_length: u32,
    /// The largest solicited burst this target accepts.
    pub max_burst_length: u32,
    /// The largest unsolicited burst (immediate + unsolicited Data-Out).
    pub first_burst_length: u32,
    /// R2Ts outstanding per task.
    pub max_outstanding_r2t: u32,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_recv_data_segment_length: 256 << 10,
            // The largest value the key allows, rounded to 512 bytes.
            max_burst_length: (1 << 24) - 512,
            first_burst_length: 256 << 10,
            max_outstanding_r2t: 8,
        }
    }
}

/// The negotiated operational parameters of one session and connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Params {
    /// CRC32C on headers.
    pub header_digest: bool,
    /// CRC32C on data segments.
    pub data_digest: bool,
    /// What the initiator receives at most per PDU (bounds Data-In size).
    pub initiator_mrdsl: u32,
    /// What this target receives at most per PDU.
    pub target_mrdsl: u32,
    /// Largest burst of a sequence, either direction.
    pub max_burst_length: u32,
    /// Largest unsolicited burst.
    pub first_burst_length: u32,
    /// Whether the initiator must wait for an R2T before any Data-Out.
    pub initial_r2t: bool,
    /// Whether SCSI Command PDUs may carry write data.
    pub immediate_data: bool,
    /// R2Ts outstanding per task.
    pub max_outstanding_r2t: u32,
}

impl Params {
    /// RFC 7143 §13 defaults, before anything is negotiated.
    pub fn defaults(limits: &Limits) -> Self {
        Self {
            header_digest: false,
            data_digest: false,
            initiator_mrdsl: 8192,
            target_mrdsl: limits.max_recv_data_segment_length,
            max_burst_length: 262_144.min(limits.max_burst_length),
            first_burst_length: 65_536.min(limits.first_burst_length),
            initial_r2t: true,
            immediate_data: true,
            max_outstanding_r2t: 1,
        }
    }
}

/// The target side of one negotiation (a login, or a text exchange in full
/// feature phase): answers each offered key and tracks the result.
#[derive(Debug)]
pub struct Negotiation {
    limits: Limits,
    /// The parameters as negotiated so far.
    pub params: Params,
    /// Declarations the initiator made (InitiatorName, SessionType, ...).
    declared: BTreeMap<String, String>,
    /// Whether the target has declared its MaxRecvDataSegmentLength.
    sent_mrdsl: bool,
}

/// An answer to an offered value.
fn yes_no(b: bool) -> String {
    if b { "Yes" } else { "No" }.to_owned()
}

fn parse_bool(v: &str) -> Option<bool> {
    match v {
        "Yes" => Some(true),
        "No" => Some(false),
        _ => None,
    }
}

fn parse_num(v: &str, lo: u32, hi: u32) -> Option<u32> {
    let n: u32 = if let Some(h) = v.strip_prefix("0x").or_else(|| v.strip_prefix("0X")) {
        u32::from_str_radix(h, 16).ok()?
    } else {
        v.parse().ok()?
    };
    (lo..=hi).contains(&n).then_some(n)
}

/// Keys only the login's security or leading phase uses; a text exchange
/// in full feature phase may not change them.
const LOGIN_ONLY: &[&str] = &[
    "InitiatorName",
    "SessionType",
    "TargetName",
    "MaxConnections",
    "InitialR2T",
    "ImmediateData",
    "MaxBurstLength",
    "FirstBurstLength",
    "DefaultTime2Wait",
    "DefaultTime2Retain",
    "MaxOutstandingR2T",
    "DataPDUInOrder",
    "DataSequenceInOrder",
    "ErrorRecoveryLevel",
    "HeaderDigest",
    "DataDigest",
];

impl Negotiation {
    /// A negotiation starting from the defaults.
    pub fn new(limits: Limits) -> Self {
        Self {
            limits,
            params: Params::defaults(&limits),
            declared: BTreeMap::new(),
            sent_mrdsl: false,
        }
    }

    /// Answers the operational keys in `offered`, in order. Keys the
    /// login handles itself (security keys) must be taken out before.
    /// `in_login` is false for text exchanges in full feature phase, where
    /// only a few keys may be renegotiated.
    pub fn answer(
        &mut self,
        offered: &[(String, String)],
        in_login: bool,
    ) -> Vec<(String, String)> {
        let mut out = Vec::new();
        for (k, v) in offered {
            if !in_login && LOGIN_ONLY.contains(&k.as_str()) {
                out.push((k.clone(), "Reject".into()));
                continue;
            }
            if let Some(a) = self.answer_one(k, v) {
                out.push((k.clone(), a));
            }
        }
        if in_login && !self.sent_mrdsl {
            // Declarative: without it the initiator would assume 8192.
            self.sent_mrdsl = true;
            out.push((
                "MaxRecvDataSegmentLength".into(),
                self.params.target_mrdsl.to_string(),
            ));
        }
        out
    }

    fn answer_one(&mut self, k: &str, v: &str) -> Option<String> {
        const MAX24: u32 = (1 << 24) - 1;
        let p = &mut self.params;
        let reject = || Some("Reject".to_owned());
        match k {
            "InitiatorName" | "InitiatorAlias" | "SessionType" | "TargetName" => {
                self.declared.insert(k.to_owned(), v.to_owned());
                None
            }
            "HeaderDigest" | "DataDigest" => {
                // A list in the initiator's order of preference.
                let pick = v.split(',').find(|x| *x == "CRC32C" || *x == "None");
                let Some(pick) = pick else { return reject() };
                if k == "HeaderDigest" {
                    p.header_digest = pick == "CRC32C";
                } else {
                    p.data_digest = pick == "CRC32C";
                }
                Some(pick.to_owned())
            }
            "MaxConnections" => parse_num(v, 1, 65535).map_or_else(reject, |_| Some("1".into())),
            "InitialR2T" => match parse_bool(v) {
                // OR: this target does not need the initial R2T.
                Some(b) => {
                    p.initial_r2t = b;
                    Some(yes_no(b))
                }
                None => reject(),
            },
            "ImmediateData" => match parse_bool(v) {
                // AND: this target takes immediate data.
                Some(b) => {
                    p.immediate_data = b;
                    Some(yes_no(b))
                }
                None => reject(),
            },
            "MaxRecvDataSegmentLength" => match parse_num(v, 512, MAX24) {
                // Declarative: what the initiator can receive.
                Some(n) => {
                    p.initiator_mrdsl = n;
                    None
                }
                None => reject(),
            },
            "MaxBurstLength" => match parse_num(v, 512, MAX24) {
                Some(n) => {
                    p.max_burst_length = n.min(self.limits.max_burst_length);
                    p.first_burst_length = p.first_burst_length.min(p.max_burst_length);
                    Some(p.max_burst_length.to_string())
                }
                None => reject(),
            },
            "FirstBurstLength" => match parse_num(v, 512, MAX24) {
                Some(n) => {
                    p.first_burst_length = n
                        .min(self.limits.first_burst_length)
                        .min(p.max_burst_length);
                    Some(p.first_burst_length.to_string())
                }
                None => reject(),
            },
            "MaxOutstandingR2T" => match parse_num(v, 1, 65535) {
                Some(n) => {
                    p.max_outstanding_r2t = n.min(self.limits.max_outstanding_r2t);
                    Some(p.max_outstanding_r2t.to_string())
                }
                None => reject(),
            },
            "DefaultTime2Wait" => {
                parse_num(v, 0, 3600).map_or_else(reject, |n| Some(n.max(2).to_string()))
            }
            "DefaultTime2Retain" => parse_num(v, 0, 3600).map_or_else(reject, |_| Some("0".into())),
            // This target delivers and expects data in order: OR with Yes.
            "DataPDUInOrder" | "DataSequenceInOrder" => {
                parse_bool(v).map_or_else(reject, |_| Some("Yes".into()))
            }
            "ErrorRecoveryLevel" => parse_num(v, 0, 2).map_or_else(reject, |_| Some("0".into())),
            "IFMarker" | "OFMarker" => parse_bool(v).map_or_else(reject, |_| Some("No".into())),
            "OFMarkInt" | "IFMarkInt" => Some("Irrelevant".into()),
            _ => Some("NotUnderstood".into()),
        }
    }

    /// The declared value of `key`, if the initiator sent it.
    pub fn declared(&self, key: &str) -> Option<&str> {
        self.declared.get(key).map(String::as_str)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn pairs(s: &[(&str, &str)]) -> Vec<(String, String)> {
        s.iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    #[test]
    fn a_linux_initiators_offer_gets_consistent_answers() {
        let mut n = Negotiation::new(Limits::default());
        let a = n.answer(
            &pairs(&[
                ("HeaderDigest", "None,CRC32C"),
                ("DataDigest", "CRC32C,None"),
                ("MaxRecvDataSegmentLength", "262144"),
                ("MaxBurstLength", "16776192"),
                ("FirstBurstLength", "262144"),
                ("InitialR2T", "No"),
                ("ImmediateData", "Yes"),
                ("MaxOutstandingR2T", "1"),
                ("ErrorRecoveryLevel", "0"),
                ("X-com.example.foo", "1"),
            ]),
            true,
        );
        let get = |k: &str| a.iter().find(|(x, _)| x == k).map(|(_, v)| v.as_str());
        assert_eq!(get("HeaderDigest"), Some("None"));
        assert_eq!(get("DataDigest"), Some("CRC32C"));
        assert_eq!(get("MaxRecvDataSegmentLength"), Some("262144"));
        assert_eq!(get("InitialR2T"), Some("No"));
        assert_eq!(get("X-com.example.foo"), Some("NotUnderstood"));
        assert!(n.params.data_digest && !n.params.header_digest);
        assert_eq!(n.params.initiator_mrdsl, 262_144);
        assert!(!n.params.initial_r2t && n.params.immediate_data);
    }

    #[test]
    fn out_of_range_values_are_rejected() {
        let mut n = Negotiation::new(Limits::default());
        let a = n.answer(
            &pairs(&[("MaxBurstLength", "100"), ("ImmediateData", "Maybe")]),
            true,
        );
        assert_eq!(a[0].1, "Reject");
        assert_eq!(a[1].1, "Reject");
        assert_eq!(n.params, {
            let mut p = Params::defaults(&Limits::default());
            p.target_mrdsl = Limits::default().max_recv_data_segment_length;
            p
        });
    }

    #[test]
    fn duplicate_keys_are_a_protocol_error() {
        assert_eq!(parse(b"A=1\0A=2\0"), Err(TextError::Duplicate("A".into())));
        assert!(parse(b"novalue\0").is_err());
    }

    proptest! {
        #[test]
        fn text_round_trips(
            kv in proptest::collection::btree_map("[A-Za-z][A-Za-z0-9.:-]{0,20}", "[ -~&&[^=]]{0,30}", 0..8)
        ) {
            let pairs: Vec<(String, String)> = kv.into_iter().collect();
            prop_assert_eq!(parse(&encode(&pairs)).unwrap(), pairs);
        }

        #[test]
        fn parse_never_panics(data in proptest::collection::vec(any::<u8>(), 0..200)) {
            let _ = parse(&data);
        }
    }
}
