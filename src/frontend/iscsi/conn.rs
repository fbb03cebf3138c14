//! One iSCSI connection (and, with MaxConnections=1, its session): the
//! login, then the full feature phase: command numbering and the CmdSN
//! window, write data collection (immediate, unsolicited, R2T-solicited),
//! Data-In and status, task management, NOP keepalive, text (SendTargets)
//! and logout.
//!
//! Tasks: the reader task owns the socket's read half and every write still
//! collecting data; commands whose data is complete run as their own tokio
//! tasks on the logical units; one writer task owns the write half and
//! stamps StatSN, ExpCmdSN and MaxCmdSN on each PDU as it is sent, so those
//! numbers follow the order PDUs really leave in.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use tokio::io::{AsyncReadExt, AsyncWriteExt, BufReader, BufWriter};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, Notify};

use super::login::{Established, Login, SessionType, Step, CMD_WINDOW, TPGT};
use super::pdu::{self, at, op, reject, Bhs, FrameError, Framing, BHS_LEN, NO_TAG};
use super::scsi::{LogicalUnits, Response, Sense};
use super::text;
use super::Target;

/// How long a login may take per PDU before the connection is dropped.
const LOGIN_TIMEOUT: Duration = Duration::from_secs(15);
/// The most data one command may transfer; larger ones are refused before
/// any buffer is allocated.
pub const MAX_COMMAND_BYTES: u64 = 64 << 20;
/// Write data one connection may hold at once (collecting or being
/// written). Beyond it a command gets TASK SET FULL and the initiator
/// retries it, so no initiator can make the engine buffer without bound.
const BUFFER_BUDGET: u64 = 256 << 20;

/// Why a connection ended abnormally.
#[derive(Debug, thiserror::Error)]
enum ConnError {
    #[error("socket: {0}")]
    Io(#[from] std::io::Error),
    #[error("{0}")]
    Frame(#[from] FrameError),
    #[error("login timed out")]
    LoginTimeout,
    #[error("Data-Out PDU out of sequence")]
    Sequence,
}

/// A PDU as read: header, additional header segments, data.
struct Pdu {
    bhs: Bhs,
    ahs: Vec<u8>,
    data: Vec<u8>,
}

/// Reads one PDU; `None` on a clean end of stream between PDUs.
async fn read_pdu(
    r: &mut BufReader<OwnedReadHalf>,
    framing: Framing,
    max_data: usize,
) -> Result<Option<Pdu>, ConnError> {
    let mut head = [0u8; BHS_LEN];
    match r.read_exact(&mut head).await {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e.into()),
    }
    let bhs = Bhs(head);
    let mut ahs = vec![0u8; bhs.ahs_len()];
    r.read_exact(&mut ahs).await?;
    if framing.header_digest {
        let mut d = [0u8; 4];
        r.read_exact(&mut d).await?;
        let mut whole = head.to_vec();
        whole.extend_from_slice(&ahs);
        pdu::check_header_digest(&whole, &d)?;
    }
    let len = bhs.data_len();
    if len > max_data {
        return Err(FrameError::TooLong { len, max: max_data }.into());
    }
    let mut wire = vec![0u8; framing.data_wire_len(&bhs)];
    r.read_exact(&mut wire).await?;
    pdu::open_data(&bhs, &wire, framing)?;
    wire.truncate(len);
    Ok(Some(Pdu {
        bhs,
        ahs,
        data: wire,
    }))
}

/// What the writer sends.
enum Out {
    Pdu(Bhs, Bytes),
    /// Flush and end the connection.
    Close,
}

/// State shared by the reader, the command tasks and the writer.
struct Shared {
    framing: Framing,
    /// The largest data segment the initiator receives (Data-In size).
    initiator_mrdsl: usize,
    /// The longest Data-In sequence (it ends with the F bit).
    max_burst: usize,
    exp_cmd_sn: AtomicU32,
    /// Numbered commands accepted and not yet answered; they shrink the
    /// window so the initiator cannot queue without bound.
    pending: AtomicU32,
    /// Bytes of write buffers held, against [`BUFFER_BUDGET`].
    buffered: AtomicU64,
    running: Mutex<HashMap<u32, Running>>,
    task_done: Notify,
    tx: mpsc::UnboundedSender<Out>,
    /// Set when the connection must end (keepalive lost, reinstatement).
    kill: Notify,
    last_rx: Mutex<tokio::time::Instant>,
}

struct Running {
    lun: u64,
    aborted: bool,
}

impl Shared {
    fn send(&self, bhs: Bhs, data: impl Into<Bytes>) {
        let _ = self.tx.send(Out::Pdu(bhs, data.into()));
    }

    fn max_cmd_sn(&self) -> u32 {
        let free = CMD_WINDOW.saturating_sub(self.pending.load(Ordering::Acquire));
        self.exp_cmd_sn
            .load(Ordering::Acquire)
            .wrapping_add(free)
            .wrapping_sub(1)
    }

    /// A numbered command has its final answer: its window slot frees.
    fn answered(&self, cmd: &Bhs) {
        if !cmd.immediate() {
            self.pending.fetch_sub(1, Ordering::AcqRel);
        }
    }

    fn reject(&self, reason: u8, bad: &Bhs) {
        let mut h = Bhs::new(op::REJECT);
        h.set_flags(0x80);
        h.0[2] = reason;
        h.set_itt(NO_TAG);
        self.send(h, bad.0.to_vec());
    }

    /// Waits until no running task satisfies `pred`.
    async fn wait_tasks(&self, pred: impl Fn(&Running) -> bool) {
        loop {
            let n = self.task_done.notified();
            tokio::pin!(n);
            n.as_mut().enable();
            if !self.running.lock().expect("poisoned").values().any(&pred) {
                return;
            }
            n.await;
        }
    }
}

/// Stamps sequence numbers and writes PDUs in order.
async fn writer(
    wr: OwnedWriteHalf,
    mut rx: mpsc::UnboundedReceiver<Out>,
    shared: Arc<Shared>,
    mut stat_sn: u32,
) {
    let mut w = BufWriter::with_capacity(256 << 10, wr);
    while let Some(o) = rx.recv().await {
        let (mut bhs, data) = match o {
            Out::Pdu(b, d) => (b, d),
            Out::Close => break,
        };
        let opcode = bhs.opcode();
        let advances = match opcode {
            op::SCSI_RSP | op::TMF_RSP | op::LOGOUT_RSP | op::TEXT_RSP | op::REJECT => true,
            op::DATA_IN => bhs.flags() & 0x01 != 0,
            op::NOP_IN => bhs.itt() != NO_TAG,
            _ => false,
        };
        if opcode != op::DATA_IN || advances {
            bhs.set_u32(at::STATSN, stat_sn);
        }
        if advances {
            stat_sn = stat_sn.wrapping_add(1);
        }
        bhs.set_u32(at::EXPCMDSN, shared.exp_cmd_sn.load(Ordering::Acquire));
        bhs.set_u32(at::MAXCMDSN, shared.max_cmd_sn());
        bhs.0[4] = 0;
        bhs.set_data_len(data.len());
        let f = shared.framing;
        let mut r = w.write_all(&bhs.0).await;
        if f.header_digest && r.is_ok() {
            r = w.write_all(&pdu::digest(&[&bhs.0])).await;
        }
        if !data.is_empty() && r.is_ok() {
            let pad = [0u8; 4];
            let padn = data.len().next_multiple_of(4) - data.len();
            r = w.write_all(&data).await;
            if r.is_ok() && padn > 0 {
                r = w.write_all(&pad[..padn]).await;
            }
            if f.data_digest && r.is_ok() {
                r = w.write_all(&pdu::digest(&[&data, &pad[..padn]])).await;
            }
        }
        if r.is_ok() && rx.is_empty() {
            // Commands finishing together (one replica reply read carries
            // several) get one turn to queue their responses, so one send
            // carries them all.
            tokio::task::yield_now().await;
            if rx.is_empty() {
                r = w.flush().await;
            }
        }
        if let Err(e) = r {
            tracing::debug!(error = %e, "iSCSI connection write failed");
            shared.kill.notify_one();
            return;
        }
    }
    let _ = w.flush().await;
    let _ = w.shutdown().await;
}

/// A write collecting its data-out.
struct Collecting {
    /// The command's header: LUN, tag, expected length, immediate bit.
    cmd: Bhs,
    cdb: Vec<u8>,
    /// What the CDB says the command transfers (for the residual).
    needed: u64,
    buf: Vec<u8>,
    unsolicited_done: bool,
    next_r2t_offset: u32,
    r2t_sn: u32,
    /// Outstanding R2Ts: transfer tag → (offset, length, bytes received,
    /// next DataSN).
    r2ts: HashMap<u32, (u32, u32, u32, u32)>,
    /// Next DataSN of the unsolicited sequence.
    unsolicited_sn: u32,
}

/// Serves one TCP connection until it ends.
pub async fn serve(target: Arc<Target>, stream: TcpStream) {
    let peer = stream
        .peer_addr()
        .map_or_else(|_| "?".into(), |a| a.to_string());
    let span = tracing::info_span!("iscsi", peer = %peer);
    let _g = span.enter();
    if let Err(e) = run(target, stream).await {
        tracing::info!(error = %e, "iSCSI connection closed");
    }
}

async fn run(target: Arc<Target>, stream: TcpStream) -> Result<(), ConnError> {
    let _ = stream.set_nodelay(true);
    let portal = stream.local_addr()?.to_string();
    let (rd, mut wr) = stream.into_split();
    let mut rd = BufReader::with_capacity(256 << 10, rd);
    let plain = Framing {
        header_digest: false,
        data_digest: false,
    };
    let mut login = Login::new(target.cfg.clone(), target.next_tsih());
    let est = loop {
        let pdu = tokio::time::timeout(
            LOGIN_TIMEOUT,
            read_pdu(
                &mut rd,
                plain,
                target.cfg.limits.max_recv_data_segment_length as usize,
            ),
        )
        .await
        .map_err(|_| ConnError::LoginTimeout)??;
        let Some(pdu) = pdu else { return Ok(()) };
        match login.step(&pdu.bhs, &pdu.data) {
            Step::Continue(h, d) => wr.write_all(&pdu::encode(h, &d, plain)).await?,
            Step::Refuse(h, d) => {
                wr.write_all(&pdu::encode(h, &d, plain)).await?;
                return Ok(());
            }
            Step::Done(h, d, est) => {
                wr.write_all(&pdu::encode(h, &d, plain)).await?;
                break est;
            }
        }
    };
    full_feature(target, rd, wr, *est, portal).await
}

fn nexus_name(est: &Established) -> String {
    let mut s = format!("{},i,0x", est.initiator);
    for b in est.isid {
        s.push_str(&format!("{b:02x}"));
    }
    s
}

async fn full_feature(
    target: Arc<Target>,
    mut rd: BufReader<OwnedReadHalf>,
    wr: OwnedWriteHalf,
    est: Established,
    portal: String,
) -> Result<(), ConnError> {
    let framing = Framing {
        header_digest: est.params.header_digest,
        data_digest: est.params.data_digest,
    };
    let (tx, rx) = mpsc::unbounded_channel();
    let shared = Arc::new(Shared {
        framing,
        initiator_mrdsl: est.params.initiator_mrdsl as usize,
        max_burst: est.params.max_burst_length as usize,
        exp_cmd_sn: AtomicU32::new(est.exp_cmd_sn),
        pending: AtomicU32::new(0),
        buffered: AtomicU64::new(0),
        running: Mutex::new(HashMap::new()),
        task_done: Notify::new(),
        tx,
        kill: Notify::new(),
        last_rx: Mutex::new(tokio::time::Instant::now()),
    });
    let writer = tokio::spawn(writer(wr, rx, shared.clone(), est.stat_sn));
    let nexus = nexus_name(&est);
    let registration = (est.session_type == SessionType::Normal)
        .then(|| target.sessions.register(&nexus, shared.clone()));
    let keepalive = tokio::spawn(keepalive(shared.clone(), target.nop));
    let mut c = Conn {
        target: target.clone(),
        shared: shared.clone(),
        est,
        nexus,
        collecting: HashMap::new(),
        next_ttt: 1,
        portal,
    };
    let r = c.read_loop(&mut rd).await;
    keepalive.abort();
    // Every running command finishes (the engine's I/O is never cut short);
    // what it would answer is dropped with the connection.
    shared.wait_tasks(|_| true).await;
    let _ = shared.tx.send(Out::Close);
    let _ = writer.await;
    if let Some(id) = registration {
        target.sessions.unregister(&c.nexus, id);
        target.lus.nexus_gone(&c.nexus);
    }
    r
}

/// Pings an initiator idle for `nop` (NOP-In) and drops it when it stays
/// silent for `nop` more; never, with `None`.
async fn keepalive(shared: Arc<Shared>, nop: Option<Duration>) {
    let Some(nop) = nop else { return };
    let mut tick = tokio::time::interval((nop / 4).max(Duration::from_millis(100)));
    let mut pinged = false;
    loop {
        tick.tick().await;
        let idle = shared.last_rx.lock().expect("poisoned").elapsed();
        if idle < nop {
            pinged = false;
            continue;
        }
        if idle > nop * 2 {
            tracing::warn!("iSCSI initiator stopped answering pings; dropping the connection");
            shared.kill.notify_one();
            return;
        }
        if !pinged {
            pinged = true;
            let mut h = Bhs::new(op::NOP_IN);
            h.set_flags(0x80);
            h.set_lun_raw(0);
            h.set_itt(NO_TAG);
            h.set_u32(at::TTT, 0x7fff_fff0);
            shared.send(h, Vec::new());
        }
    }
}

struct Conn {
    target: Arc<Target>,
    shared: Arc<Shared>,
    est: Established,
    nexus: String,
    collecting: HashMap<u32, Collecting>,
    next_ttt: u32,
    /// The address the initiator reached this target on, for SendTargets.
    portal: String,
}

impl Conn {
    async fn read_loop(&mut self, rd: &mut BufReader<OwnedReadHalf>) -> Result<(), ConnError> {
        let max = self.est.params.target_mrdsl as usize;
        loop {
            let pdu = tokio::select! {
                p = read_pdu(rd, self.shared.framing, max) => p,
                () = self.shared.kill.notified() => return Ok(()),
            };
            let pdu = match pdu {
                Ok(Some(p)) => p,
                Ok(None) => return Ok(()),
                Err(ConnError::Frame(FrameError::DataDigest)) => {
                    // The lengths were sound, the payload was not: reject
                    // it; at error recovery level 0 the command cannot be
                    // repaired, so the connection ends.
                    return Err(FrameError::DataDigest.into());
                }
                Err(e) => return Err(e),
            };
            *self.shared.last_rx.lock().expect("poisoned") = tokio::time::Instant::now();
            if self.dispatch(pdu).await? {
                return Ok(());
            }
        }
    }

    /// Checks a numbered PDU's CmdSN; false means it must be ignored.
    fn accept_cmd_sn(&self, bhs: &Bhs) -> bool {
        let sn = bhs.u32_at(at::CMDSN);
        let exp = self.shared.exp_cmd_sn.load(Ordering::Acquire);
        if bhs.immediate() {
            return true;
        }
        if sn != exp {
            // Outside the window (or a gap, impossible on one connection):
            // RFC 7143 §3.2.2.1 says ignore it.
            tracing::debug!(
                cmd_sn = sn,
                exp_cmd_sn = exp,
                "ignoring a command out of sequence"
            );
            return false;
        }
        if pdu::sn_lt(self.shared.max_cmd_sn(), sn) {
            return false;
        }
        self.shared
            .exp_cmd_sn
            .store(exp.wrapping_add(1), Ordering::Release);
        self.shared.pending.fetch_add(1, Ordering::AcqRel);
        true
    }

    /// Handles one PDU; true ends the connection.
    async fn dispatch(&mut self, p: Pdu) -> Result<bool, ConnError> {
        let discovery = self.est.session_type == SessionType::Discovery;
        match p.bhs.opcode() {
            op::NOP_OUT => self.nop_out(&p),
            op::SCSI_CMD if !discovery => self.scsi_command(p),
            op::DATA_OUT if !discovery => self.data_out(&p)?,
            op::TMF_REQ if !discovery => self.task_management(&p),
            op::TEXT_REQ => self.text(&p),
            op::LOGOUT_REQ => return Ok(self.logout(&p).await),
            op::SNACK => self.shared.reject(reject::NOT_SUPPORTED, &p.bhs),
            op::LOGIN_REQ => self.shared.reject(reject::PROTOCOL, &p.bhs),
            _ => self.shared.reject(reject::NOT_SUPPORTED, &p.bhs),
        }
        Ok(false)
    }

    fn nop_out(&mut self, p: &Pdu) {
        if p.bhs.itt() == NO_TAG {
            // An answer to our ping, or a one-way NOP: no response.
            if !p.bhs.immediate() {
                // Must be immediate (RFC 7143 §11.18): ignore silently.
            }
            return;
        }
        if !self.accept_cmd_sn(&p.bhs) {
            return;
        }
        let mut h = Bhs::new(op::NOP_IN);
        h.set_flags(0x80);
        h.set_lun_raw(p.bhs.lun_raw());
        h.set_itt(p.bhs.itt());
        h.set_u32(at::TTT, NO_TAG);
        self.shared.answered(&p.bhs);
        self.shared.send(h, p.data.clone());
    }

    fn scsi_command(&mut self, p: Pdu) {
        let bhs = p.bhs;
        let itt = bhs.itt();
        if !self.accept_cmd_sn(&bhs) {
            return;
        }
        let in_use = self.collecting.contains_key(&itt)
            || self
                .shared
                .running
                .lock()
                .expect("poisoned")
                .contains_key(&itt);
        if in_use {
            self.shared.answered(&bhs);
            self.shared.reject(0x07, &bhs); // task in progress
            return;
        }
        let mut cdb = bhs.0[32..48].to_vec();
        // An extended CDB (AHS type 1) carries the bytes beyond 16.
        if p.ahs.len() >= 4 && p.ahs[2] == 1 {
            let n = usize::from(u16::from_be_bytes([p.ahs[0], p.ahs[1]]));
            let tail = &p.ahs[4..(3 + n).min(p.ahs.len())];
            cdb.extend_from_slice(tail);
        }
        let edtl = bhs.u32_at(at::EDTL);
        let write = bhs.flags() & 0x20 != 0;
        let needed = if write {
            LogicalUnits::data_out_len(&cdb)
        } else {
            0
        };
        // Everything the initiator sends is collected and handed over, even
        // more or less than the CDB asks: the logical unit decides (a short
        // write writes the whole blocks that came, a WRITE SAME with the
        // wrong amount is refused).
        let want = if write { u64::from(edtl) } else { 0 };
        let refuse = |resp| {
            self.shared.answered(&bhs);
            send_response(&self.shared, &bhs, needed, resp);
        };
        if want > MAX_COMMAND_BYTES {
            // More data than any command here may move (the logical
            // unit refuses the same transfer lengths): refuse before
            // allocating a buffer for it.
            return refuse(Response::check(Sense::invalid_field_in_cdb(0)));
        }
        let held = self.shared.buffered.fetch_add(want, Ordering::AcqRel);
        if held > 0 && held + want > BUFFER_BUDGET {
            self.shared.buffered.fetch_sub(want, Ordering::AcqRel);
            return refuse(Response::task_set_full());
        }
        let want = usize::try_from(want).expect("bounded above");
        // The immediate data starts the buffer: no copy for the common
        // write whose data all rides in the command PDU.
        let imm_len = p.data.len();
        let mut buf = p.data;
        buf.resize(want, 0);
        let mut c = Collecting {
            cmd: bhs,
            cdb,
            needed,
            buf,
            // Only writes carry data; a read with F clear sends nothing more.
            unsolicited_done: bhs.final_bit() || !write,
            next_r2t_offset: 0,
            r2t_sn: 0,
            r2ts: HashMap::new(),
            unsolicited_sn: 0,
        };
        let params = self.est.params;
        let unsolicited_total = if c.unsolicited_done || params.initial_r2t {
            imm_len
        } else {
            (params.first_burst_length as usize).min(edtl as usize)
        };
        c.unsolicited_done |= params.initial_r2t;
        c.next_r2t_offset = u32::try_from(unsolicited_total.min(want)).expect("bounded");
        self.collecting.insert(itt, c);
        self.advance(itt);
    }

    /// Issues R2Ts as the window allows, or runs the command once every
    /// byte is in.
    fn advance(&mut self, itt: u32) {
        let params = self.est.params;
        let Some(c) = self.collecting.get_mut(&itt) else {
            return;
        };
        let bhs = c.cmd;
        let want = u32::try_from(c.buf.len()).expect("bounded");
        while c.unsolicited_done
            && c.next_r2t_offset < want
            && c.r2ts.len() < params.max_outstanding_r2t as usize
        {
            let len = (want - c.next_r2t_offset).min(params.max_burst_length);
            let ttt = self.next_ttt;
            self.next_ttt = self.next_ttt.wrapping_add(1).max(1) & 0x7fff_ffff;
            let mut h = Bhs::new(op::R2T);
            h.set_flags(0x80);
            h.set_lun_raw(bhs.lun_raw());
            h.set_itt(itt);
            h.set_u32(at::TTT, ttt);
            h.set_u32(at::DATASN, c.r2t_sn);
            h.set_u32(at::BUFFER_OFFSET, c.next_r2t_offset);
            h.set_u32(at::RESIDUAL, len);
            c.r2ts.insert(ttt, (c.next_r2t_offset, len, 0, 0));
            c.r2t_sn += 1;
            c.next_r2t_offset += len;
            self.shared.send(h, Vec::new());
        }
        let complete = c.unsolicited_done && c.r2ts.is_empty() && c.next_r2t_offset >= want;
        if complete {
            let c = self.collecting.remove(&itt).expect("present");
            self.execute(itt, c);
        }
    }

    fn data_out(&mut self, p: &Pdu) -> Result<(), ConnError> {
        let itt = p.bhs.itt();
        let ttt = p.bhs.u32_at(at::TTT);
        let data_sn = p.bhs.u32_at(at::DATASN);
        let offset = p.bhs.u32_at(at::BUFFER_OFFSET) as usize;
        let Some(c) = self.collecting.get_mut(&itt) else {
            // Data for a task that is gone (aborted): drop it.
            return Ok(());
        };
        // A Data-Out out of sequence cannot be recovered at error recovery
        // level 0: reject it and end the connection (RFC 7143 §7.1.3).
        let out_of_sequence = |shared: &Shared| {
            shared.reject(reject::PROTOCOL, &p.bhs);
            Err(ConnError::Sequence)
        };
        if ttt == NO_TAG {
            if c.unsolicited_done || data_sn != c.unsolicited_sn {
                return out_of_sequence(&self.shared);
            }
            c.unsolicited_sn += 1;
            if p.bhs.final_bit() {
                c.unsolicited_done = true;
            }
        } else {
            let Some(r) = c.r2ts.get_mut(&ttt) else {
                self.shared.reject(reject::INVALID_FIELD, &p.bhs);
                return Ok(());
            };
            let end = offset + p.data.len();
            if offset < r.0 as usize || end > (r.0 + r.1) as usize || data_sn != r.3 {
                return out_of_sequence(&self.shared);
            }
            r.3 += 1;
            r.2 += u32::try_from(p.data.len()).expect("bounded by MRDSL");
            if r.2 >= r.1 || p.bhs.final_bit() {
                c.r2ts.remove(&ttt);
            }
        }
        if offset < c.buf.len() {
            let n = p.data.len().min(c.buf.len() - offset);
            c.buf[offset..offset + n].copy_from_slice(&p.data[..n]);
        }
        self.advance(itt);
        Ok(())
    }

    /// Runs a command whose data is complete, as its own task.
    fn execute(&mut self, itt: u32, c: Collecting) {
        let lun = c.cmd.lun();
        self.shared.running.lock().expect("poisoned").insert(
            itt,
            Running {
                lun,
                aborted: false,
            },
        );
        let shared = self.shared.clone();
        let lus = self.target.lus.clone();
        let nexus = self.nexus.clone();
        tokio::spawn(async move {
            let resp = lus.execute(&nexus, lun, &c.cdb, &c.buf).await;
            shared
                .buffered
                .fetch_sub(c.buf.len() as u64, Ordering::AcqRel);
            tracing::trace!(
                itt,
                lun,
                opcode = c.cdb[0],
                data_out = c.buf.len(),
                status = resp.status,
                sense = ?resp.sense.get(12..14),
                "SCSI command done"
            );
            let mut running = shared.running.lock().expect("poisoned");
            let aborted = running.remove(&itt).is_none_or(|r| r.aborted);
            shared.answered(&c.cmd);
            if !aborted {
                send_response(&shared, &c.cmd, c.needed, resp);
            }
            drop(running);
            shared.task_done.notify_waiters();
        });
    }

    fn task_management(&mut self, p: &Pdu) {
        let bhs = p.bhs;
        if !self.accept_cmd_sn(&bhs) {
            return;
        }
        let function = bhs.flags() & 0x7f;
        let lun = bhs.lun();
        let referenced = bhs.u32_at(20);
        // Which tasks this function ends.
        let hits: Box<dyn Fn(u32, u64) -> bool + Send + Sync> = match function {
            1 => Box::new(move |itt, _| itt == referenced),
            2 | 4 | 5 => Box::new(move |_, l| l == lun),
            6 => Box::new(|_, _| true),
            _ => {
                // CLEAR ACA, cold reset, reassign: not supported at ERL 0.
                let code = if function == 8 { 4 } else { 5 };
                self.tmf_respond(&bhs, code);
                return;
            }
        };
        let mut found = false;
        let aborted: Vec<u32> = self
            .collecting
            .iter()
            .filter(|(itt, c)| hits(**itt, c.cmd.lun()))
            .map(|(itt, _)| *itt)
            .collect();
        for itt in aborted {
            found = true;
            if let Some(c) = self.collecting.remove(&itt) {
                self.shared
                    .buffered
                    .fetch_sub(c.buf.len() as u64, Ordering::AcqRel);
                self.shared.answered(&c.cmd);
            }
        }
        {
            let mut running = self.shared.running.lock().expect("poisoned");
            for (itt, r) in running.iter_mut() {
                if hits(*itt, r.lun) {
                    r.aborted = true;
                    found = true;
                }
            }
        }
        match function {
            5 => self.target.lus.reset(lun, &self.nexus),
            // A target reset resets every logical unit.
            6 => {
                for l in 0..=1 {
                    self.target.lus.reset(l, &self.nexus);
                }
            }
            _ => {}
        }
        let code = if function == 1 && !found {
            // RFC 7143 §11.5.1: a task that is not here but whose CmdSN
            // was already received counts as done.
            let ref_sn = bhs.u32_at(32);
            let exp = self.shared.exp_cmd_sn.load(Ordering::Acquire);
            if pdu::sn_lt(ref_sn, exp) {
                0
            } else {
                1
            }
        } else {
            0
        };
        let shared = self.shared.clone();
        tokio::spawn(async move {
            // Aborted tasks finish their I/O first; only then is the
            // function complete.
            shared.wait_tasks(|r| r.aborted).await;
            let mut h = Bhs::new(op::TMF_RSP);
            h.set_flags(0x80);
            h.0[2] = code;
            h.set_itt(bhs.itt());
            shared.answered(&bhs);
            shared.send(h, Vec::new());
        });
    }

    fn tmf_respond(&self, req: &Bhs, code: u8) {
        let mut h = Bhs::new(op::TMF_RSP);
        h.set_flags(0x80);
        h.0[2] = code;
        h.set_itt(req.itt());
        self.shared.answered(req);
        self.shared.send(h, Vec::new());
    }

    fn text(&mut self, p: &Pdu) {
        if !self.accept_cmd_sn(&p.bhs) {
            return;
        }
        let mut h = Bhs::new(op::TEXT_RSP);
        h.set_flags(0x80);
        h.set_itt(p.bhs.itt());
        h.set_u32(at::TTT, NO_TAG);
        let Ok(keys) = text::parse(&p.data) else {
            self.shared.answered(&p.bhs);
            self.shared.reject(reject::PROTOCOL, &p.bhs);
            return;
        };
        let mut answer: Vec<(String, String)> = Vec::new();
        let mut rest = Vec::new();
        for (k, v) in keys {
            if k == "SendTargets" {
                let all = v == "All" && self.est.session_type == SessionType::Discovery;
                let cfg = &self.target.cfg;
                if all || v.is_empty() || v == cfg.name {
                    answer.push(("TargetName".into(), cfg.name.clone()));
                    answer.push(("TargetAddress".into(), format!("{},{TPGT}", self.portal)));
                }
            } else {
                rest.push((k, v));
            }
        }
        let mut neg = text::Negotiation::new(self.target.cfg.limits);
        neg.params = self.est.params;
        answer.extend(neg.answer(&rest, false));
        self.shared.answered(&p.bhs);
        self.shared.send(h, text::encode(&answer));
    }

    /// Answers a logout once outstanding commands are done; true when the
    /// connection is to close.
    async fn logout(&mut self, p: &Pdu) -> bool {
        if !self.accept_cmd_sn(&p.bhs) {
            return false;
        }
        let reason = p.bhs.flags() & 0x7f;
        // Outstanding commands finish and answer before the logout does.
        self.shared.wait_tasks(|_| true).await;
        let mut h = Bhs::new(op::LOGOUT_RSP);
        h.set_flags(0x80);
        h.0[2] = if reason == 2 { 2 } else { 0 };
        h.set_itt(p.bhs.itt());
        self.shared.answered(&p.bhs);
        self.shared.send(h, Vec::new());
        true
    }
}

/// Sends a command's Data-In PDUs and status, with residuals against the
/// initiator's expected length.
fn send_response(shared: &Shared, cmd: &Bhs, needed: u64, resp: Response) {
    let itt = cmd.itt();
    let edtl = cmd.u32_at(at::EDTL);
    let write = cmd.flags() & 0x20 != 0;
    let edtl64 = u64::from(edtl);
    // Residual: what the command would move against what was expected.
    let actual = if write {
        needed
    } else {
        resp.data.len() as u64
    };
    let (flag, residual) = match actual.cmp(&edtl64) {
        std::cmp::Ordering::Less => (0x02u8, edtl64 - actual),
        std::cmp::Ordering::Greater => (0x04u8, actual - edtl64),
        std::cmp::Ordering::Equal => (0, 0),
    };
    let residual = u32::try_from(residual).unwrap_or(u32::MAX);
    let data = Bytes::from(resp.data);
    let send_len = if write {
        0
    } else {
        data.len().min(edtl as usize)
    };
    let good = resp.status == 0 && resp.sense.is_empty();
    let mrdsl = shared.initiator_mrdsl;
    let mut off = 0;
    let mut data_sn = 0u32;
    while off < send_len {
        let seq_left = shared.max_burst - off % shared.max_burst;
        let n = (send_len - off).min(mrdsl).min(seq_left);
        let last = off + n == send_len;
        let mut h = Bhs::new(op::DATA_IN);
        let mut flags = 0u8;
        if n == seq_left {
            flags |= 0x80;
        }
        if last {
            flags |= 0x80;
            if good {
                flags |= 0x01 | flag;
                h.0[3] = resp.status;
                h.set_u32(at::RESIDUAL, residual);
            }
        }
        h.set_flags(flags);
        h.set_lun_raw(cmd.lun_raw());
        h.set_itt(itt);
        h.set_u32(at::TTT, NO_TAG);
        h.set_u32(at::DATASN, data_sn);
        h.set_u32(at::BUFFER_OFFSET, u32::try_from(off).expect("bounded"));
        shared.send(h, data.slice(off..off + n));
        data_sn += 1;
        off += n;
    }
    if send_len > 0 && good {
        return;
    }
    let mut h = Bhs::new(op::SCSI_RSP);
    h.set_flags(0x80 | flag);
    h.0[2] = 0;
    h.0[3] = resp.status;
    h.set_itt(itt);
    h.set_u32(at::DATASN, data_sn);
    h.set_u32(at::RESIDUAL, residual);
    let mut seg = Vec::new();
    if !resp.sense.is_empty() {
        let n = u16::try_from(resp.sense.len()).expect("short sense");
        seg.extend_from_slice(&n.to_be_bytes());
        seg.extend_from_slice(&resp.sense);
    }
    shared.send(h, seg);
}

/// Sessions by nexus, so a new login with the same initiator name and ISID
/// replaces (reinstates) the old session.
#[derive(Default)]
pub struct Sessions {
    by_nexus: Mutex<HashMap<String, (u64, Arc<Shared>)>>,
    next: AtomicU64,
}

impl std::fmt::Debug for Sessions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sessions").finish_non_exhaustive()
    }
}

impl Sessions {
    fn register(&self, nexus: &str, s: Arc<Shared>) -> u64 {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        let old = self
            .by_nexus
            .lock()
            .expect("poisoned")
            .insert(nexus.to_owned(), (id, s));
        if let Some((_, old)) = old {
            tracing::info!(nexus, "session reinstated; closing the old one");
            old.kill.notify_one();
        }
        id
    }

    fn unregister(&self, nexus: &str, id: u64) {
        let mut m = self.by_nexus.lock().expect("poisoned");
        if m.get(nexus).is_some_and(|(i, _)| *i == id) {
            m.remove(nexus);
        }
    }
}
