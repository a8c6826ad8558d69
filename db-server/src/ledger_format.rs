//! The ledger's on-volume format, its redo and its verifier.
//!
//! Block 0 is the superblock, blocks `1..=accounts` hold one account record
//! each, and a ring of `log_blocks` log records follows. Every record carries
//! a BLAKE3 checksum of its fields, checked when read back. All integers are
//! little-endian and fixed-width.
//!
//! A transaction moves an amount between two accounts: it writes one log
//! block and both account blocks. The log record carries the post-images
//! (both new balances), so it is the transaction's redo: the ledger writes
//! it, and waits for the array's acknowledgement, before either account
//! block ([`crate::ledger`] says why that order is enough).
//! [`LedgerBlocks::redo`] completes the transactions a crash left logged but
//! not applied, as opening the ledger does.
//!
//! The invariant is that the balances add up to `accounts ×
//! initial_balance`. The verifier is strict: it also fails a torn
//! transaction — a log record or an account that names sequence `S` while
//! the other account of that transaction has not reached `S` — because a
//! quiesced snapshot holds none. It tells the two kinds of failure apart: an
//! image that only needs a redo (a crash image, which opening the ledger
//! repairs) reports `redo_pending > 0` with `ok_after_redo`; a broken
//! ledger reports `ok_after_redo: false`.

use serde::Serialize;

const SUPERBLOCK_MAGIC: &[u8; 8] = b"SMLEDGR1";
const ACCOUNT_MAGIC: &[u8; 4] = b"ACCT";
const LOG_MAGIC: &[u8; 4] = b"LOGR";
const DIGEST_BYTES: usize = 32;

/// Where everything lives on the volume.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Layout {
    pub block_size_bytes: u32,
    pub accounts: u32,
    pub initial_balance: i64,
    pub log_blocks: u64,
}

impl Layout {
    pub fn account_lba(&self, account: u32) -> u64 {
        1 + u64::from(account)
    }

    pub fn log_start_lba(&self) -> u64 {
        1 + u64::from(self.accounts)
    }

    pub fn log_lba(&self, sequence: u64) -> u64 {
        self.log_start_lba() + sequence % self.log_blocks
    }

    /// Blocks the whole ledger occupies.
    pub fn total_blocks(&self) -> u64 {
        self.log_start_lba() + self.log_blocks
    }

    pub fn total_balance(&self) -> i128 {
        i128::from(self.accounts) * i128::from(self.initial_balance)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Account {
    pub id: u32,
    pub balance: i64,
    pub last_sequence: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LogRecord {
    pub sequence: u64,
    pub from: u32,
    pub to: u32,
    pub amount: i64,
    pub from_balance: i64,
    pub to_balance: i64,
}

/// Fills a block: the fields, then their checksum, then zeros.
fn seal(fields: &[u8], block_size_bytes: u32) -> Vec<u8> {
    let mut block = vec![0u8; block_size_bytes as usize];
    block[..fields.len()].copy_from_slice(fields);
    let digest = blake3::hash(fields);
    block[fields.len()..fields.len() + DIGEST_BYTES].copy_from_slice(digest.as_bytes());
    block
}

/// The fields of a sealed block, if its checksum holds.
fn unseal(block: &[u8], fields_len: usize) -> Option<&[u8]> {
    let fields = block.get(..fields_len)?;
    let stored = block.get(fields_len..fields_len + DIGEST_BYTES)?;
    (blake3::hash(fields).as_bytes() == stored).then_some(fields)
}

fn u32_at(bytes: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(bytes[at..at + 4].try_into().expect("4 bytes"))
}

fn u64_at(bytes: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(bytes[at..at + 8].try_into().expect("8 bytes"))
}

fn i64_at(bytes: &[u8], at: usize) -> i64 {
    i64::from_le_bytes(bytes[at..at + 8].try_into().expect("8 bytes"))
}

const SUPERBLOCK_FIELDS: usize = 8 + 4 + 4 + 8 + 8;
const ACCOUNT_FIELDS: usize = 4 + 4 + 8 + 8;
const LOG_FIELDS: usize = 4 + 8 + 4 + 4 + 8 + 8 + 8;

pub fn encode_superblock(layout: &Layout) -> Vec<u8> {
    let mut f = Vec::with_capacity(SUPERBLOCK_FIELDS);
    f.extend_from_slice(SUPERBLOCK_MAGIC);
    f.extend_from_slice(&layout.block_size_bytes.to_le_bytes());
    f.extend_from_slice(&layout.accounts.to_le_bytes());
    f.extend_from_slice(&layout.initial_balance.to_le_bytes());
    f.extend_from_slice(&layout.log_blocks.to_le_bytes());
    seal(&f, layout.block_size_bytes)
}

/// What block 0 of a volume holds.
#[derive(Debug, PartialEq, Eq)]
pub enum Superblock {
    /// All zeros: no ledger was ever formatted here.
    Empty,
    Ledger(Layout),
    /// Something else, or a ledger superblock with a bad checksum.
    Foreign,
}

pub fn decode_superblock(block: &[u8]) -> Superblock {
    if block.iter().all(|&b| b == 0) {
        return Superblock::Empty;
    }
    if block.get(..8) != Some(SUPERBLOCK_MAGIC.as_slice()) {
        return Superblock::Foreign;
    }
    match unseal(block, SUPERBLOCK_FIELDS) {
        Some(f) => {
            let layout = Layout {
                block_size_bytes: u32_at(f, 8),
                accounts: u32_at(f, 12),
                initial_balance: i64_at(f, 16),
                log_blocks: u64_at(f, 24),
            };
            if layout.block_size_bytes as usize != block.len() || layout.log_blocks == 0 {
                Superblock::Foreign
            } else {
                Superblock::Ledger(layout)
            }
        }
        None => Superblock::Foreign,
    }
}

pub fn encode_account(account: &Account, block_size_bytes: u32) -> Vec<u8> {
    let mut f = Vec::with_capacity(ACCOUNT_FIELDS);
    f.extend_from_slice(ACCOUNT_MAGIC);
    f.extend_from_slice(&account.id.to_le_bytes());
    f.extend_from_slice(&account.balance.to_le_bytes());
    f.extend_from_slice(&account.last_sequence.to_le_bytes());
    seal(&f, block_size_bytes)
}

pub fn decode_account(block: &[u8]) -> Option<Account> {
    let f = unseal(block, ACCOUNT_FIELDS)?;
    (&f[..4] == ACCOUNT_MAGIC).then(|| Account {
        id: u32_at(f, 4),
        balance: i64_at(f, 8),
        last_sequence: u64_at(f, 16),
    })
}

pub fn encode_log(record: &LogRecord, block_size_bytes: u32) -> Vec<u8> {
    let mut f = Vec::with_capacity(LOG_FIELDS);
    f.extend_from_slice(LOG_MAGIC);
    f.extend_from_slice(&record.sequence.to_le_bytes());
    f.extend_from_slice(&record.from.to_le_bytes());
    f.extend_from_slice(&record.to.to_le_bytes());
    f.extend_from_slice(&record.amount.to_le_bytes());
    f.extend_from_slice(&record.from_balance.to_le_bytes());
    f.extend_from_slice(&record.to_balance.to_le_bytes());
    seal(&f, block_size_bytes)
}

/// A log slot that is neither empty nor a valid record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BadChecksum;

/// A log slot: `Ok(None)` when never written.
pub fn decode_log(block: &[u8]) -> Result<Option<LogRecord>, BadChecksum> {
    if block.iter().all(|&b| b == 0) {
        return Ok(None);
    }
    let f = unseal(block, LOG_FIELDS).ok_or(BadChecksum)?;
    if &f[..4] != LOG_MAGIC {
        return Err(BadChecksum);
    }
    Ok(Some(LogRecord {
        sequence: u64_at(f, 4),
        from: u32_at(f, 12),
        to: u32_at(f, 16),
        amount: i64_at(f, 20),
        from_balance: i64_at(f, 28),
        to_balance: i64_at(f, 36),
    }))
}

/// The ledger's blocks as read from a volume or an image, decoded: what both
/// the verifier and [`crate::ledger::Ledger::open`] work on.
#[derive(Debug, Clone)]
pub struct LedgerBlocks {
    pub layout: Layout,
    /// Per account id: the record, or `None` when its block does not hold a
    /// valid record of that account.
    pub accounts: Vec<Option<Account>>,
    /// Per log slot: `Ok(None)` when never written.
    pub log: Vec<Result<Option<LogRecord>, BadChecksum>>,
}

/// What a redo changed: the transactions it completed and the account
/// records it rewrote (their final state, in id order).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Redo {
    pub transactions: u64,
    pub accounts: Vec<Account>,
}

impl LedgerBlocks {
    /// Decodes the account blocks (`layout.accounts` of them, from LBA 1)
    /// and the log ring (`layout.log_blocks`, from `log_start_lba`).
    pub fn decode(layout: Layout, account_bytes: &[u8], log_bytes: &[u8]) -> Self {
        let bs = layout.block_size_bytes as usize;
        let accounts = (0..layout.accounts)
            .map(|id| {
                let at = id as usize * bs;
                account_bytes
                    .get(at..at + bs)
                    .and_then(decode_account)
                    .filter(|a| a.id == id)
            })
            .collect();
        let log = (0..layout.log_blocks)
            .map(|slot| {
                let at = slot as usize * bs;
                log_bytes
                    .get(at..at + bs)
                    .map_or(Err(BadChecksum), decode_log)
            })
            .collect();
        Self {
            layout,
            accounts,
            log,
        }
    }

    /// The valid log records that sit in their own slot, in sequence order.
    fn records(&self) -> Vec<LogRecord> {
        let n = self.layout.log_blocks;
        let mut records: Vec<LogRecord> = self
            .log
            .iter()
            .enumerate()
            .filter_map(|(slot, entry)| match entry {
                Ok(Some(r)) if r.sequence % n == slot as u64 => Some(*r),
                _ => None,
            })
            .collect();
        records.sort_by_key(|r| r.sequence);
        records
    }

    /// The highest sequence any account or log record names.
    pub fn highest_sequence(&self) -> u64 {
        let accounts = self.accounts.iter().flatten().map(|a| a.last_sequence);
        let logs = self
            .log
            .iter()
            .filter_map(|e| e.ok().flatten())
            .map(|r| r.sequence);
        accounts.chain(logs).max().unwrap_or(0)
    }

    /// Completes every logged transaction whose accounts have not reached
    /// it: in sequence order, an account whose `last_sequence` is below a
    /// record's sequence takes that record's post-image. Idempotent — a
    /// second redo finds nothing to do.
    ///
    /// Why "behind ⇒ not yet applied" is sound: a transaction holds both
    /// accounts' locks from taking its sequence until both account blocks
    /// are acknowledged, and its log block is acknowledged before either
    /// account block is sent. So an account below a logged sequence `S`
    /// that names it was never written by `S` nor by anything after `S`,
    /// and the post-image in the record is exactly what `S` would have
    /// written.
    pub fn redo(&mut self) -> Redo {
        let mut redo = Redo::default();
        let mut changed = std::collections::BTreeSet::new();
        for record in self.records() {
            let mut behind = false;
            for (id, balance) in [
                (record.from, record.from_balance),
                (record.to, record.to_balance),
            ] {
                if let Some(Some(account)) = self.accounts.get_mut(id as usize)
                    && account.last_sequence < record.sequence
                {
                    account.balance = balance;
                    account.last_sequence = record.sequence;
                    changed.insert(id);
                    behind = true;
                }
            }
            redo.transactions += u64::from(behind);
        }
        redo.accounts = changed
            .into_iter()
            .filter_map(|id| self.accounts[id as usize])
            .collect();
        redo
    }

    /// The strict check: every record valid, the balances adding up, no
    /// transaction torn, and the highest sequence equal to
    /// `expected_sequence` if given. Answers the report with every
    /// violation found (unlisted beyond [`MAX_LISTED_VIOLATIONS`]).
    pub fn check(&self, expected_sequence: Option<u64>) -> VerifyReport {
        let layout = self.layout;
        let mut violations = Vec::new();
        let mut total_balance = 0i128;
        for (id, account) in self.accounts.iter().enumerate() {
            match account {
                Some(a) => total_balance += i128::from(a.balance),
                None => violations.push(format!(
                    "account {id} (block {}): bad checksum or not that account",
                    layout.account_lba(id as u32)
                )),
            }
        }
        let mut logs = Vec::new();
        for (slot, entry) in self.log.iter().enumerate() {
            let slot = slot as u64;
            match entry {
                Ok(Some(record)) => {
                    if record.sequence % layout.log_blocks != slot {
                        violations.push(format!(
                            "log slot {slot} holds sequence {}, which belongs in slot {}",
                            record.sequence,
                            record.sequence % layout.log_blocks
                        ));
                    }
                    logs.push(*record);
                }
                Ok(None) => {}
                Err(BadChecksum) => violations.push(format!(
                    "log slot {slot} (block {}): bad checksum",
                    layout.log_start_lba() + slot
                )),
            }
        }
        if total_balance != layout.total_balance() {
            violations.push(format!(
                "balances add up to {total_balance} instead of {}",
                layout.total_balance()
            ));
        }
        let account = |id: u32| self.accounts.get(id as usize).copied().flatten();
        for record in &logs {
            for (side, id, balance) in [
                ("from", record.from, record.from_balance),
                ("to", record.to, record.to_balance),
            ] {
                match account(id) {
                    Some(a) if a.last_sequence < record.sequence => violations.push(format!(
                        "torn transaction {}: logged, but account {id} ({side}) is only at sequence {}",
                        record.sequence, a.last_sequence
                    )),
                    Some(a) if a.last_sequence == record.sequence && a.balance != balance => {
                        violations.push(format!(
                            "transaction {}: account {id} holds {} but the log says {balance}",
                            record.sequence, a.balance
                        ))
                    }
                    None if id >= layout.accounts => violations.push(format!(
                        "transaction {} names account {id}, beyond the {} accounts",
                        record.sequence, layout.accounts
                    )),
                    _ => {}
                }
            }
        }
        // An account written by a transaction whose log record is still in
        // the ring: the other account must have reached that sequence too.
        for a in self.accounts.iter().flatten() {
            if a.last_sequence == 0 {
                continue;
            }
            let slot = a.last_sequence % layout.log_blocks;
            let logged = logs.iter().find(|r| r.sequence % layout.log_blocks == slot);
            match logged {
                Some(r) if r.sequence == a.last_sequence => {
                    let other = if r.from == a.id { r.to } else { r.from };
                    if r.from != a.id && r.to != a.id {
                        violations.push(format!(
                            "account {} claims sequence {}, which moved {} → {}",
                            a.id, a.last_sequence, r.from, r.to
                        ));
                    } else if account(other).is_some_and(|o| o.last_sequence < a.last_sequence) {
                        violations.push(format!(
                            "torn transaction {}: account {} written, account {other} not",
                            a.last_sequence, a.id
                        ));
                    }
                }
                Some(r) if r.sequence < a.last_sequence => violations.push(format!(
                    "torn transaction {}: account {} written, its log record not",
                    a.last_sequence, a.id
                )),
                None => violations.push(format!(
                    "torn transaction {}: account {} written, its log record not",
                    a.last_sequence, a.id
                )),
                _ => {} // the ring has moved past it
            }
        }
        let highest_sequence = self.highest_sequence();
        if let Some(expected) = expected_sequence
            && highest_sequence != expected
        {
            violations.push(format!(
                "highest sequence is {highest_sequence} but the snapshot was taken at {expected}"
            ));
        }
        let total = violations.len();
        violations.truncate(MAX_LISTED_VIOLATIONS);
        if total > MAX_LISTED_VIOLATIONS {
            violations.push(format!("… and {} more", total - MAX_LISTED_VIOLATIONS));
        }
        VerifyReport {
            ok: total == 0,
            layout: Some(layout),
            accounts_checked: u64::from(layout.accounts),
            log_records_checked: logs.len() as u64,
            total_balance,
            expected_total_balance: layout.total_balance(),
            highest_sequence,
            redo_pending: 0,
            ok_after_redo: total == 0,
            violations,
        }
    }
}

/// What the verifier found in an image.
#[derive(Debug, Clone, Serialize)]
pub struct VerifyReport {
    pub ok: bool,
    pub layout: Option<Layout>,
    pub accounts_checked: u64,
    pub log_records_checked: u64,
    pub total_balance: i128,
    pub expected_total_balance: i128,
    pub highest_sequence: u64,
    /// Logged transactions whose accounts have not reached them: what a
    /// crash leaves and opening the ledger redoes. A quiesced snapshot holds
    /// none, so any makes `ok` false.
    pub redo_pending: u64,
    /// Whether the image would pass after the redo that opening the ledger
    /// performs: a crash image (`ok` false, this true) is repairable; a
    /// broken ledger (both false) is not.
    pub ok_after_redo: bool,
    pub violations: Vec<String>,
}

/// At most this many violations are listed; the count says if there were more.
pub const MAX_LISTED_VIOLATIONS: usize = 20;

/// Checks a ledger image (the bytes of a data volume, or a backup of it):
/// superblock, every checksum, the balance invariant, torn transactions, and
/// `expected_sequence` if given. Strict: an image that needs a redo — a
/// crash image rather than a quiesced snapshot — fails, and the report says
/// so apart from a broken invariant (`redo_pending`, `ok_after_redo`, and a
/// first violation that names the redo).
pub fn verify_image(image: &[u8], expected_sequence: Option<u64>) -> VerifyReport {
    let failed = |violation: String, layout| VerifyReport {
        ok: false,
        layout,
        accounts_checked: 0,
        log_records_checked: 0,
        total_balance: 0,
        expected_total_balance: layout.map_or(0, |l: Layout| l.total_balance()),
        highest_sequence: 0,
        redo_pending: 0,
        ok_after_redo: false,
        violations: vec![violation],
    };
    // The superblock says the block size; try both sizes the array offers.
    let layout =
        [4096usize, 512]
            .iter()
            .find_map(|&size| match decode_superblock(image.get(..size)?) {
                Superblock::Ledger(layout) => Some(layout),
                _ => None,
            });
    let Some(layout) = layout else {
        return failed("no valid ledger superblock in block 0".into(), None);
    };
    let bs = u64::from(layout.block_size_bytes);
    if (image.len() as u64) < layout.total_blocks() * bs {
        return failed(
            format!(
                "image of {} bytes is shorter than the ledger ({} blocks)",
                image.len(),
                layout.total_blocks()
            ),
            Some(layout),
        );
    }
    let bytes = |lba: u64, blocks: u64| &image[(lba * bs) as usize..((lba + blocks) * bs) as usize];
    let blocks = LedgerBlocks::decode(
        layout,
        bytes(layout.account_lba(0), u64::from(layout.accounts)),
        bytes(layout.log_start_lba(), layout.log_blocks),
    );
    let mut report = blocks.check(expected_sequence);
    let mut redone = blocks.clone();
    let redo = redone.redo();
    if redo.transactions > 0 {
        let after = redone.check(expected_sequence);
        report.redo_pending = redo.transactions;
        report.ok_after_redo = after.ok;
        let verdict = if after.ok {
            "a crash image, not a quiesced snapshot; opening the ledger repairs it".to_string()
        } else {
            format!(
                "and even after the redo the ledger is broken: {}",
                after.violations.join("; ")
            )
        };
        report.violations.insert(
            0,
            format!(
                "{} transactions need redo (logged, their accounts not yet written): {verdict}",
                redo.transactions
            ),
        );
    }
    report
}

#[cfg(test)]
mod tests {
    use super::*;

    const LAYOUT: Layout = Layout {
        block_size_bytes: 512,
        accounts: 4,
        initial_balance: 100,
        log_blocks: 8,
    };

    /// A clean image after `transfers` (from, to, amount), built by hand.
    fn image(transfers: &[(u32, u32, i64)]) -> (Vec<u8>, Vec<Vec<u8>>) {
        let bs = LAYOUT.block_size_bytes;
        let mut img = vec![0u8; LAYOUT.total_blocks() as usize * bs as usize];
        let put = |img: &mut Vec<u8>, lba: u64, block: &[u8]| {
            let at = lba as usize * bs as usize;
            img[at..at + bs as usize].copy_from_slice(block);
        };
        put(&mut img, 0, &encode_superblock(&LAYOUT));
        let mut accounts: Vec<Account> = (0..LAYOUT.accounts)
            .map(|id| Account {
                id,
                balance: LAYOUT.initial_balance,
                last_sequence: 0,
            })
            .collect();
        let mut last_writes = Vec::new();
        for (i, &(from, to, amount)) in transfers.iter().enumerate() {
            let sequence = i as u64 + 1;
            accounts[from as usize].balance -= amount;
            accounts[to as usize].balance += amount;
            accounts[from as usize].last_sequence = sequence;
            accounts[to as usize].last_sequence = sequence;
            let log = LogRecord {
                sequence,
                from,
                to,
                amount,
                from_balance: accounts[from as usize].balance,
                to_balance: accounts[to as usize].balance,
            };
            put(&mut img, LAYOUT.log_lba(sequence), &encode_log(&log, bs));
            last_writes = vec![
                encode_account(&accounts[from as usize], bs),
                encode_account(&accounts[to as usize], bs),
            ];
        }
        for a in &accounts {
            put(&mut img, LAYOUT.account_lba(a.id), &encode_account(a, bs));
        }
        (img, last_writes)
    }

    #[test]
    fn a_clean_ledger_passes() {
        let (img, _) = image(&[(0, 1, 10), (2, 3, 5), (1, 2, 7)]);
        let report = verify_image(&img, Some(3));
        assert!(report.ok, "{:?}", report.violations);
        assert_eq!(report.highest_sequence, 3);
        assert_eq!(report.total_balance, 400);
        // Past the ring: 20 transfers through 8 log slots.
        let many: Vec<_> = (0..20).map(|i| (i % 4, (i + 1) % 4, 3)).collect();
        let (img, _) = image(&many);
        assert!(verify_image(&img, Some(20)).ok);
    }

    #[test]
    fn a_wrong_expected_sequence_fails() {
        let (img, _) = image(&[(0, 1, 10)]);
        assert!(!verify_image(&img, Some(2)).ok);
    }

    #[test]
    fn a_torn_transaction_fails() {
        // Transaction 2 (0 → 3) wrote account 0 but not account 3.
        let (img_before, _) = image(&[(0, 1, 10)]);
        let (img_after, _) = image(&[(0, 1, 10), (0, 3, 5)]);
        let mut torn = img_before.clone();
        let bs = LAYOUT.block_size_bytes as usize;
        for lba in [LAYOUT.account_lba(0), LAYOUT.log_lba(2)] {
            let at = lba as usize * bs;
            torn[at..at + bs].copy_from_slice(&img_after[at..at + bs]);
        }
        let report = verify_image(&torn, None);
        assert!(!report.ok);
        assert!(
            report.violations.iter().any(|v| v.contains("torn")),
            "{:?}",
            report.violations
        );
        // Without the log record, the invariant still catches it.
        let mut torn = img_before;
        let at = LAYOUT.account_lba(0) as usize * bs;
        torn[at..at + bs].copy_from_slice(&img_after[at..at + bs]);
        assert!(!verify_image(&torn, None).ok);
    }

    /// Transaction 2 (0 → 3) torn: its log record and account 0 written,
    /// account 3 not — what a crash between the two account writes leaves.
    fn torn_after_log() -> Vec<u8> {
        let (img_before, _) = image(&[(0, 1, 10)]);
        let (img_after, _) = image(&[(0, 1, 10), (0, 3, 5)]);
        let mut torn = img_before;
        let bs = LAYOUT.block_size_bytes as usize;
        for lba in [LAYOUT.account_lba(0), LAYOUT.log_lba(2)] {
            let at = lba as usize * bs;
            torn[at..at + bs].copy_from_slice(&img_after[at..at + bs]);
        }
        torn
    }

    fn blocks_of(img: &[u8]) -> LedgerBlocks {
        let bs = LAYOUT.block_size_bytes as usize;
        let at = |lba: u64| lba as usize * bs;
        LedgerBlocks::decode(
            LAYOUT,
            &img[at(1)..at(LAYOUT.log_start_lba())],
            &img[at(LAYOUT.log_start_lba())..at(LAYOUT.total_blocks())],
        )
    }

    #[test]
    fn a_logged_transaction_is_reported_as_needing_redo_and_redo_repairs_it() {
        let torn = torn_after_log();
        let report = verify_image(&torn, Some(2));
        assert!(!report.ok, "strict: a crash image is not a snapshot");
        assert_eq!(report.redo_pending, 1);
        assert!(report.ok_after_redo, "{:?}", report.violations);
        assert!(
            report.violations[0].contains("need redo"),
            "{:?}",
            report.violations
        );
        let mut blocks = blocks_of(&torn);
        let redo = blocks.redo();
        assert_eq!(redo.transactions, 1);
        assert_eq!(
            redo.accounts,
            vec![Account {
                id: 3,
                balance: 105,
                last_sequence: 2
            }]
        );
        assert!(blocks.check(Some(2)).ok);
        // Idempotent: a crash during the redo is redone the same way.
        assert_eq!(blocks.redo(), Redo::default());
        // The same as the clean ledger, account for account.
        let (clean, _) = image(&[(0, 1, 10), (0, 3, 5)]);
        assert_eq!(blocks.accounts, blocks_of(&clean).accounts);
    }

    #[test]
    fn redo_applies_post_images_in_sequence_order() {
        // Transactions 1 and 2 both logged, neither applied (as after a
        // ledger stopped between log and accounts and one more before it).
        let (before, _) = image(&[]);
        let (after, _) = image(&[(0, 1, 10), (1, 2, 4)]);
        let bs = LAYOUT.block_size_bytes as usize;
        let mut img = before;
        for lba in [LAYOUT.log_lba(1), LAYOUT.log_lba(2)] {
            let at = lba as usize * bs;
            img[at..at + bs].copy_from_slice(&after[at..at + bs]);
        }
        let mut blocks = blocks_of(&img);
        assert_eq!(blocks.redo().transactions, 2);
        assert_eq!(blocks.accounts, blocks_of(&after).accounts);
    }

    #[test]
    fn an_account_written_before_its_log_is_not_repairable() {
        // The order the ledger no longer uses: account 0 of transaction 2
        // written, its log record not. No redo can find account 3's half.
        let (img_before, _) = image(&[(0, 1, 10)]);
        let (img_after, _) = image(&[(0, 1, 10), (0, 3, 5)]);
        let mut torn = img_before;
        let at = LAYOUT.account_lba(0) as usize * 512;
        torn[at..at + 512].copy_from_slice(&img_after[at..at + 512]);
        let report = verify_image(&torn, None);
        assert!(!report.ok);
        assert_eq!(report.redo_pending, 0);
        assert!(!report.ok_after_redo);
        assert!(report.violations.iter().any(|v| v.contains("add up")));
    }

    #[test]
    fn a_bad_checksum_fails() {
        let (mut img, _) = image(&[(0, 1, 10)]);
        let at = LAYOUT.account_lba(2) as usize * 512 + 9;
        img[at] ^= 0x01;
        let report = verify_image(&img, None);
        assert!(!report.ok);
        assert!(report.violations.iter().any(|v| v.contains("checksum")));
    }

    #[test]
    fn a_broken_invariant_fails() {
        // Money from nowhere, with valid checksums and sequences.
        let (mut img, _) = image(&[(0, 1, 10)]);
        let rich = Account {
            id: 2,
            balance: 1_000,
            last_sequence: 0,
        };
        let at = LAYOUT.account_lba(2) as usize * 512;
        img[at..at + 512].copy_from_slice(&encode_account(&rich, 512));
        let report = verify_image(&img, None);
        assert!(!report.ok);
        assert!(report.violations.iter().any(|v| v.contains("add up")));
    }

    #[test]
    fn empty_and_foreign_volumes() {
        assert_eq!(decode_superblock(&[0u8; 512]), Superblock::Empty);
        assert_eq!(decode_superblock(&[7u8; 512]), Superblock::Foreign);
        assert!(!verify_image(&[0u8; 4096], None).ok);
    }
}
