//! The login phase (RFC 7143 §6.3, §11.12–13, §12.1): stage transitions,
//! leading keys, CHAP authentication (RFC 1994 with MD5, one-way or mutual)
//! and operational negotiation. [`Login::step`] is a pure state machine:
//! one Login Request in, one Login Response out.

use md5::{Digest, Md5};

use super::pdu::{at, op, Bhs};
use super::text::{self, Limits, Negotiation, Params};

/// CHAP credentials of one volume.
#[derive(Clone, PartialEq, Eq)]
pub struct Chap {
    /// The name the initiator must present (`CHAP_N`).
    pub user: String,
    /// The secret the initiator proves it knows.
    pub secret: Vec<u8>,
    /// For mutual CHAP: the target's name and secret, which the target
    /// proves to the initiator.
    pub mutual: Option<(String, Vec<u8>)>,
}

impl std::fmt::Debug for Chap {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print secrets.
        f.debug_struct("Chap")
            .field("user", &self.user)
            .field("mutual", &self.mutual.as_ref().map(|(u, _)| u))
            .finish_non_exhaustive()
    }
}

/// What a login needs to know about the target.
#[derive(Debug, Clone)]
pub struct TargetConfig {
    /// The target's IQN.
    pub name: String,
    /// CHAP, when the volume requires it.
    pub chap: Option<Chap>,
    /// What this target accepts at most.
    pub limits: Limits,
}

/// The target portal group tag of the single portal group.
pub const TPGT: u16 = 1;
/// Commands an initiator may have outstanding (the CmdSN window).
pub const CMD_WINDOW: u32 = 128;

/// Login status (class, detail), RFC 7143 §11.13.5.
pub mod status {
    /// Success.
    pub const SUCCESS: (u8, u8) = (0, 0);
    /// Miscellaneous initiator error (a malformed request).
    pub const INITIATOR_ERROR: (u8, u8) = (2, 0);
    /// Authentication failed.
    pub const AUTH_FAILED: (u8, u8) = (2, 1);
    /// The target name is not known here.
    pub const NOT_FOUND: (u8, u8) = (2, 3);
    /// No version in the initiator's range is supported.
    pub const UNSUPPORTED_VERSION: (u8, u8) = (2, 5);
    /// Too many connections in the session.
    pub const TOO_MANY_CONNECTIONS: (u8, u8) = (2, 6);
    /// A required key is missing.
    pub const MISSING_PARAMETER: (u8, u8) = (2, 7);
    /// The session type is not supported.
    pub const SESSION_TYPE: (u8, u8) = (2, 9);
    /// The TSIH names no session.
    pub const NO_SESSION: (u8, u8) = (2, 0x0a);
    /// A request not valid at this point of the login.
    pub const INVALID_REQUEST: (u8, u8) = (2, 0x0b);
}

/// Normal or discovery.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SessionType {
    /// SCSI commands to the target's LUNs.
    Normal,
    /// SendTargets only.
    Discovery,
}

/// A session that finished its login.
#[derive(Debug, Clone)]
pub struct Established {
    /// Negotiated parameters.
    pub params: Params,
    /// Normal or discovery.
    pub session_type: SessionType,
    /// The initiator's IQN.
    pub initiator: String,
    /// Initiator session id.
    pub isid: [u8; 6],
    /// The handle this target gave the session.
    pub tsih: u16,
    /// The next CmdSN expected.
    pub exp_cmd_sn: u32,
    /// The next StatSN to send.
    pub stat_sn: u32,
}

/// One step's result.
#[derive(Debug)]
pub enum Step {
    /// Send this response and wait for the next request.
    Continue(Bhs, Vec<u8>),
    /// Send this response; the connection is in full feature phase.
    Done(Bhs, Vec<u8>, Box<Established>),
    /// Send this response and close the connection.
    Refuse(Bhs, Vec<u8>),
}

#[derive(Debug, PartialEq, Eq)]
enum ChapState {
    /// AuthMethod not yet agreed, or None agreed.
    Idle,
    /// CHAP agreed; waiting for `CHAP_A`.
    WantAlgorithm,
    /// Challenge sent; waiting for `CHAP_N`/`CHAP_R`.
    Challenged { id: u8, challenge: [u8; 16] },
    /// The initiator proved itself.
    Passed,
}

/// The target's side of one connection's login.
#[derive(Debug)]
pub struct Login {
    cfg: TargetConfig,
    new_tsih: u16,
    neg: Negotiation,
    first: bool,
    isid: [u8; 6],
    itt: u32,
    stat_sn: u32,
    exp_cmd_sn: u32,
    stage: u8,
    chap: ChapState,
    /// Text of a request continued over several PDUs (C bit).
    pending: Vec<u8>,
    sent_tpgt: bool,
}

fn hex(b: &[u8]) -> String {
    let mut s = String::from("0x");
    for x in b {
        s.push_str(&format!("{x:02x}"));
    }
    s
}

fn unhex(s: &str) -> Option<Vec<u8>> {
    let h = s.strip_prefix("0x").or_else(|| s.strip_prefix("0X"))?;
    if h.len() % 2 != 0 || h.is_empty() {
        return None;
    }
    (0..h.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&h[i..i + 2], 16).ok())
        .collect()
}

/// The CHAP response to `challenge` with `id` and `secret` (RFC 1994 §4.1).
pub fn chap_response(id: u8, secret: &[u8], challenge: &[u8]) -> [u8; 16] {
    let mut h = Md5::new();
    h.update([id]);
    h.update(secret);
    h.update(challenge);
    h.finalize().into()
}

fn random<const N: usize>() -> [u8; N] {
    let mut b = [0u8; N];
    let mut got = 0;
    while got < N {
        // SAFETY: the pointer and length describe the unfilled tail of `b`.
        let r = unsafe { libc::getrandom(b[got..].as_mut_ptr().cast(), N - got, 0) };
        if let Ok(n) = usize::try_from(r) {
            got += n;
        }
    }
    b
}

/// Compares without an early exit, so timing does not reveal how much of a
/// CHAP response was right.
fn same(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

impl Login {
    /// A login on a new connection; `new_tsih` is the handle a new session
    /// gets.
    pub fn new(cfg: TargetConfig, new_tsih: u16) -> Self {
        Self {
            neg: Negotiation::new(cfg.limits),
            cfg,
            new_tsih,
            first: true,
            isid: [0; 6],
            itt: 0,
            stat_sn: u32::from_be_bytes(random::<4>()) & 0x00ff_ffff,
            exp_cmd_sn: 0,
            stage: 0,
            chap: ChapState::Idle,
            pending: Vec::new(),
            sent_tpgt: false,
        }
    }

    fn response(&mut self, flags: u8, status: (u8, u8), tsih: u16) -> Bhs {
        let mut h = Bhs::new(op::LOGIN_RSP);
        h.set_flags(flags);
        h.0[8..14].copy_from_slice(&self.isid);
        h.0[14..16].copy_from_slice(&tsih.to_be_bytes());
        h.set_itt(self.itt);
        h.set_u32(at::STATSN, self.stat_sn);
        self.stat_sn = self.stat_sn.wrapping_add(1);
        h.set_u32(at::EXPCMDSN, self.exp_cmd_sn);
        h.set_u32(at::MAXCMDSN, self.exp_cmd_sn.wrapping_add(CMD_WINDOW - 1));
        h.0[36] = status.0;
        h.0[37] = status.1;
        h
    }

    fn refuse(&mut self, status: (u8, u8)) -> Step {
        let flags = self.stage << 2;
        tracing::info!(class = status.0, detail = status.1, "iSCSI login refused");
        Step::Refuse(self.response(flags, status, 0), Vec::new())
    }

    /// Takes one Login Request.
    pub fn step(&mut self, req: &Bhs, data: &[u8]) -> Step {
        if req.opcode() != op::LOGIN_REQ {
            return self.refuse(status::INVALID_REQUEST);
        }
        let flags = req.flags();
        let (transit, cont) = (flags & 0x80 != 0, flags & 0x40 != 0);
        let (csg, nsg) = ((flags >> 2) & 3, flags & 3);
        if self.first {
            self.first = false;
            self.isid.copy_from_slice(&req.0[8..14]);
            self.exp_cmd_sn = req.u32_at(at::CMDSN);
            // The initiator may skip the security stage.
            self.stage = csg;
            // Version-max must reach 0, version-min must allow it.
            if req.0[3] != 0 {
                self.itt = req.itt();
                return self.refuse(status::UNSUPPORTED_VERSION);
            }
            if u16::from_be_bytes([req.0[14], req.0[15]]) != 0 {
                // Adding a connection to a session: this target runs one
                // connection per session (MaxConnections=1).
                self.itt = req.itt();
                return self.refuse(status::NO_SESSION);
            }
        } else if req.0[8..14] != self.isid {
            return self.refuse(status::INVALID_REQUEST);
        }
        self.itt = req.itt();
        if csg != self.stage || csg == 2 || csg == 3 || (transit && (nsg <= csg || nsg == 2)) {
            return self.refuse(status::INVALID_REQUEST);
        }
        self.pending.extend_from_slice(data);
        if cont {
            // More text follows: acknowledge with an empty response.
            let h = self.response(self.stage << 2, status::SUCCESS, 0);
            return Step::Continue(h, Vec::new());
        }
        let raw = std::mem::take(&mut self.pending);
        let Ok(keys) = text::parse(&raw) else {
            return self.refuse(status::INITIATOR_ERROR);
        };
        let (security, operational): (Vec<_>, Vec<_>) = keys
            .into_iter()
            .partition(|(k, _)| k == "AuthMethod" || k.starts_with("CHAP_"));
        let mut answer = Vec::new();
        // Leading and operational keys may come in either stage.
        answer.extend(self.neg.answer(&operational, true));
        if let Err(s) = self.check_leading() {
            return self.refuse(s);
        }
        let discovery = self.neg.declared("SessionType") == Some("Discovery");
        if csg == 0 {
            match self.security(&security) {
                Ok(a) => answer.extend(a),
                Err(s) => return self.refuse(s),
            }
        } else if !security.is_empty() {
            return self.refuse(status::INVALID_REQUEST);
        }
        if self.first_response_needs_tpgt(discovery) {
            answer.push(("TargetPortalGroupTag".into(), TPGT.to_string()));
        }
        // Leaving the security stage needs a finished authentication.
        let auth_done = self.cfg.chap.is_none() || self.chap == ChapState::Passed;
        let may_transit = transit && (csg != 0 || auth_done) && !self.chap_in_progress();
        if transit && csg == 0 && !auth_done && !self.chap_in_progress() {
            return self.refuse(status::AUTH_FAILED);
        }
        if csg == 1 && self.cfg.chap.is_some() && self.chap != ChapState::Passed {
            // Operational stage reached without authenticating.
            return self.refuse(status::AUTH_FAILED);
        }
        let data = text::encode(&answer);
        if !may_transit {
            let h = self.response(csg << 2, status::SUCCESS, 0);
            return Step::Continue(h, data);
        }
        self.stage = nsg;
        if nsg != 3 {
            let h = self.response(0x80 | (csg << 2) | nsg, status::SUCCESS, 0);
            return Step::Continue(h, data);
        }
        let tsih = self.new_tsih;
        let h = self.response(0x80 | (csg << 2) | 3, status::SUCCESS, tsih);
        let done = Established {
            params: self.neg.params,
            session_type: if discovery {
                SessionType::Discovery
            } else {
                SessionType::Normal
            },
            initiator: self
                .neg
                .declared("InitiatorName")
                .unwrap_or_default()
                .to_owned(),
            isid: self.isid,
            tsih,
            exp_cmd_sn: self.exp_cmd_sn,
            stat_sn: self.stat_sn,
        };
        tracing::info!(
            initiator = %done.initiator,
            session_type = ?done.session_type,
            header_digest = done.params.header_digest,
            data_digest = done.params.data_digest,
            "iSCSI login complete"
        );
        Step::Done(h, data, Box::new(done))
    }

    /// TargetPortalGroupTag goes in the first response to a normal
    /// session's login (RFC 7143 §13.9); sent once.
    fn first_response_needs_tpgt(&mut self, discovery: bool) -> bool {
        let send = !discovery && !self.sent_tpgt;
        self.sent_tpgt |= send;
        send
    }

    fn chap_in_progress(&self) -> bool {
        matches!(
            self.chap,
            ChapState::WantAlgorithm | ChapState::Challenged { .. }
        )
    }

    fn check_leading(&self) -> Result<(), (u8, u8)> {
        if self.neg.declared("InitiatorName").is_none() {
            return Err(status::MISSING_PARAMETER);
        }
        match self.neg.declared("SessionType").unwrap_or("Normal") {
            "Discovery" => Ok(()),
            "Normal" => match self.neg.declared("TargetName") {
                None => Err(status::MISSING_PARAMETER),
                Some(t) if t == self.cfg.name => Ok(()),
                Some(_) => Err(status::NOT_FOUND),
            },
            _ => Err(status::SESSION_TYPE),
        }
    }

    /// Answers the security keys of one request.
    fn security(&mut self, keys: &[(String, String)]) -> Result<Vec<(String, String)>, (u8, u8)> {
        let get = |k: &str| keys.iter().find(|(x, _)| x == k).map(|(_, v)| v.as_str());
        let mut out = Vec::new();
        if let Some(methods) = get("AuthMethod") {
            let want = if self.cfg.chap.is_some() {
                "CHAP"
            } else {
                "None"
            };
            if methods.split(',').any(|m| m == want) {
                out.push(("AuthMethod".to_owned(), want.to_owned()));
                if want == "CHAP" {
                    self.chap = ChapState::WantAlgorithm;
                }
            } else {
                return Err(status::AUTH_FAILED);
            }
        }
        let Some(cfg) = self.cfg.chap.clone() else {
            return if keys.iter().any(|(k, _)| k.starts_with("CHAP_")) {
                Err(status::INVALID_REQUEST)
            } else {
                Ok(out)
            };
        };
        match &self.chap {
            ChapState::WantAlgorithm => {
                if let Some(algs) = get("CHAP_A") {
                    if !algs.split(',').any(|a| a == "5") {
                        return Err(status::AUTH_FAILED);
                    }
                    let id = random::<1>()[0];
                    let challenge = random::<16>();
                    out.push(("CHAP_A".into(), "5".into()));
                    out.push(("CHAP_I".into(), id.to_string()));
                    out.push(("CHAP_C".into(), hex(&challenge)));
                    self.chap = ChapState::Challenged { id, challenge };
                }
            }
            ChapState::Challenged { id, challenge } => {
                let (id, challenge) = (*id, *challenge);
                let (Some(name), Some(resp)) = (get("CHAP_N"), get("CHAP_R")) else {
                    return Err(status::AUTH_FAILED);
                };
                let expect = chap_response(id, &cfg.secret, &challenge);
                let ok = name == cfg.user && unhex(resp).is_some_and(|r| same(&r, &expect));
                if !ok {
                    tracing::warn!(user = name, "iSCSI CHAP authentication failed");
                    return Err(status::AUTH_FAILED);
                }
                match (get("CHAP_I"), get("CHAP_C"), &cfg.mutual) {
                    (Some(i), Some(c), Some((tuser, tsecret))) => {
                        let (Ok(i), Some(c)) = (i.parse::<u8>(), unhex(c)) else {
                            return Err(status::AUTH_FAILED);
                        };
                        // A challenge equal to ours would let the initiator
                        // reflect our own question back to us.
                        if c == challenge {
                            return Err(status::AUTH_FAILED);
                        }
                        out.push(("CHAP_N".into(), tuser.clone()));
                        out.push(("CHAP_R".into(), hex(&chap_response(i, tsecret, &c))));
                    }
                    (None, None, None) => {}
                    // The initiator wants the target to prove itself and
                    // none is configured, or the target requires mutual
                    // authentication and the initiator did not ask.
                    _ => return Err(status::AUTH_FAILED),
                }
                self.chap = ChapState::Passed;
            }
            ChapState::Idle | ChapState::Passed => {
                if keys.iter().any(|(k, _)| k.starts_with("CHAP_")) {
                    return Err(status::INVALID_REQUEST);
                }
            }
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::frontend::iscsi::text::encode;

    const TARGET: &str = "iqn.2026-11.io.shorthorn:vol";

    fn cfg(chap: Option<Chap>) -> TargetConfig {
        TargetConfig {
            name: TARGET.into(),
            chap,
            limits: Limits::default(),
        }
    }

    fn req(csg: u8, nsg: u8, transit: bool, keys: &[(&str, &str)]) -> (Bhs, Vec<u8>) {
        let mut h = Bhs::new(op::LOGIN_REQ);
        h.set_immediate();
        h.set_flags(if transit { 0x80 } else { 0 } | (csg << 2) | nsg);
        h.0[8..14].copy_from_slice(&[0x23, 0xd0, 0, 0, 0, 1]);
        h.set_itt(7);
        h.set_u32(at::CMDSN, 100);
        (h, encode(keys))
    }

    fn keys(data: &[u8]) -> Vec<(String, String)> {
        text::parse(data).unwrap()
    }

    fn get(k: &[(String, String)], key: &str) -> Option<String> {
        k.iter().find(|(x, _)| x == key).map(|(_, v)| v.clone())
    }

    #[test]
    fn a_login_without_authentication_reaches_full_feature_phase() {
        let mut l = Login::new(cfg(None), 5);
        let (h, d) = req(
            1,
            3,
            true,
            &[
                ("InitiatorName", "iqn.x"),
                ("TargetName", TARGET),
                ("ImmediateData", "Yes"),
            ],
        );
        match l.step(&h, &d) {
            Step::Done(rsp, data, est) => {
                assert_eq!(rsp.flags(), 0x87);
                assert_eq!(u16::from_be_bytes([rsp.0[14], rsp.0[15]]), 5);
                assert_eq!((rsp.0[36], rsp.0[37]), (0, 0));
                assert_eq!(rsp.u32_at(at::EXPCMDSN), 100);
                let k = keys(&data);
                assert_eq!(get(&k, "TargetPortalGroupTag").as_deref(), Some("1"));
                assert_eq!(est.initiator, "iqn.x");
                assert_eq!(est.exp_cmd_sn, 100);
            }
            s => panic!("{s:?}"),
        }
    }

    #[test]
    fn a_wrong_target_or_missing_initiator_name_is_refused() {
        let mut l = Login::new(cfg(None), 5);
        let (h, d) = req(
            1,
            3,
            true,
            &[("InitiatorName", "iqn.x"), ("TargetName", "iqn.other")],
        );
        assert!(
            matches!(l.step(&h, &d), Step::Refuse(r, _) if (r.0[36], r.0[37]) == status::NOT_FOUND)
        );
        let mut l = Login::new(cfg(None), 5);
        let (h, d) = req(1, 3, true, &[("TargetName", TARGET)]);
        assert!(
            matches!(l.step(&h, &d), Step::Refuse(r, _) if (r.0[36], r.0[37]) == status::MISSING_PARAMETER)
        );
    }

    fn chap_cfg(mutual: bool) -> Chap {
        Chap {
            user: "alice".into(),
            secret: b"secret-secret-1".to_vec(),
            mutual: mutual.then(|| ("target".into(), b"target-secret-2".to_vec())),
        }
    }

    /// Runs a CHAP login with `secret`; returns the final step.
    fn chap_login(c: Chap, secret: &[u8], mutual: Option<&[u8]>) -> Step {
        let mut l = Login::new(cfg(Some(c)), 9);
        let (h, d) = req(
            0,
            1,
            false,
            &[
                ("InitiatorName", "iqn.x"),
                ("TargetName", TARGET),
                ("AuthMethod", "CHAP,None"),
            ],
        );
        let Step::Continue(_, d1) = l.step(&h, &d) else {
            panic!()
        };
        assert_eq!(get(&keys(&d1), "AuthMethod").as_deref(), Some("CHAP"));
        let (h, d) = req(0, 1, false, &[("CHAP_A", "7,5")]);
        let Step::Continue(_, d2) = l.step(&h, &d) else {
            panic!()
        };
        let k = keys(&d2);
        let id: u8 = get(&k, "CHAP_I").unwrap().parse().unwrap();
        let c = unhex(&get(&k, "CHAP_C").unwrap()).unwrap();
        let r = hex(&chap_response(id, secret, &c));
        let mut ks = vec![("CHAP_N", "alice".to_owned()), ("CHAP_R", r)];
        if mutual.is_some() {
            ks.push(("CHAP_I", "77".into()));
            ks.push(("CHAP_C", "0x0102030405060708".into()));
        }
        let ks: Vec<(&str, &str)> = ks.iter().map(|(k, v)| (*k, v.as_str())).collect();
        let (h, d) = req(0, 1, true, &ks);
        let step = l.step(&h, &d);
        if let (Some(ts), Step::Continue(_, d3)) = (mutual, &step) {
            let k = keys(d3);
            let want = hex(&chap_response(77, ts, &[1, 2, 3, 4, 5, 6, 7, 8]));
            assert_eq!(get(&k, "CHAP_N").as_deref(), Some("target"));
            assert_eq!(get(&k, "CHAP_R"), Some(want));
        }
        step
    }

    #[test]
    fn chap_accepts_the_right_secret_and_refuses_a_wrong_one() {
        assert!(matches!(
            chap_login(chap_cfg(false), b"secret-secret-1", None),
            Step::Continue(r, _) if r.flags() == 0x81
        ));
        assert!(matches!(
            chap_login(chap_cfg(false), b"wrong-secret-00", None),
            Step::Refuse(r, _) if (r.0[36], r.0[37]) == status::AUTH_FAILED
        ));
    }

    #[test]
    fn mutual_chap_proves_the_target_and_requires_the_initiators_challenge() {
        assert!(matches!(
            chap_login(chap_cfg(true), b"secret-secret-1", Some(b"target-secret-2")),
            Step::Continue(r, _) if r.flags() == 0x81
        ));
        // The target is configured for mutual CHAP, the initiator did not ask.
        assert!(matches!(
            chap_login(chap_cfg(true), b"secret-secret-1", None),
            Step::Refuse(..)
        ));
    }

    #[test]
    fn skipping_authentication_is_refused() {
        let mut l = Login::new(cfg(Some(chap_cfg(false))), 9);
        let (h, d) = req(
            1,
            3,
            true,
            &[("InitiatorName", "iqn.x"), ("TargetName", TARGET)],
        );
        assert!(
            matches!(l.step(&h, &d), Step::Refuse(r, _) if (r.0[36], r.0[37]) == status::AUTH_FAILED)
        );
    }
}
