//! The ledger's on-volume format and its verifier.
//!
//! Block 0 is the superblock, blocks `1..=accounts` hold one account record
//! each, and a ring of `log_blocks` log records follows. Every record carries
//! a BLAKE3 checksum of its fields, checked when read back. All integers are
//! little-endian and fixed-width.
//!
//! A transaction moves an amount between two accounts: it writes both account
//! blocks and one log block. The invariant is that the balances add up to
//! `accounts × initial_balance`. The verifier also catches a torn
//! transaction — a log record or an account that names sequence `S` while
//! the other account of that transaction has not reached `S`.

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
    pub violations: Vec<String>,
}

/// At most this many violations are listed; the count says if there were more.
const MAX_LISTED_VIOLATIONS: usize = 20;

/// Checks a ledger image (the bytes of a data volume, or a backup of it):
/// superblock, every checksum, the balance invariant, torn transactions, and
/// `expected_sequence` if given.
pub fn verify_image(image: &[u8], expected_sequence: Option<u64>) -> VerifyReport {
    let mut report = VerifyReport {
        ok: false,
        layout: None,
        accounts_checked: 0,
        log_records_checked: 0,
        total_balance: 0,
        expected_total_balance: 0,
        highest_sequence: 0,
        violations: Vec::new(),
    };
    let mut violations = Vec::new();
    // The superblock says the block size; try both sizes the array offers.
    let layout =
        [4096usize, 512]
            .iter()
            .find_map(|&size| match decode_superblock(image.get(..size)?) {
                Superblock::Ledger(layout) => Some(layout),
                _ => None,
            });
    let Some(layout) = layout else {
        report
            .violations
            .push("no valid ledger superblock in block 0".into());
        return report;
    };
    report.layout = Some(layout);
    report.expected_total_balance = layout.total_balance();
    let bs = layout.block_size_bytes as usize;
    let block = |lba: u64| -> Option<&[u8]> {
        let start = usize::try_from(lba).ok()?.checked_mul(bs)?;
        image.get(start..start.checked_add(bs)?)
    };
    if (image.len() as u64) < layout.total_blocks() * bs as u64 {
        report.violations.push(format!(
            "image of {} bytes is shorter than the ledger ({} blocks)",
            image.len(),
            layout.total_blocks()
        ));
        return report;
    }
    let mut accounts = Vec::with_capacity(layout.accounts as usize);
    for id in 0..layout.accounts {
        let lba = layout.account_lba(id);
        match block(lba).and_then(decode_account) {
            Some(account) if account.id == id => {
                report.total_balance += i128::from(account.balance);
                report.highest_sequence = report.highest_sequence.max(account.last_sequence);
                accounts.push(Some(account));
            }
            Some(account) => {
                violations.push(format!(
                    "block {lba} holds account {} instead of {id}",
                    account.id
                ));
                accounts.push(None);
            }
            None => {
                violations.push(format!("account {id} (block {lba}): bad checksum"));
                accounts.push(None);
            }
        }
        report.accounts_checked += 1;
    }
    let mut logs = Vec::new();
    for slot in 0..layout.log_blocks {
        let lba = layout.log_start_lba() + slot;
        match block(lba).map(decode_log) {
            Some(Ok(Some(record))) => {
                if record.sequence % layout.log_blocks != slot {
                    violations.push(format!(
                        "log slot {slot} holds sequence {}, which belongs in slot {}",
                        record.sequence,
                        record.sequence % layout.log_blocks
                    ));
                }
                report.highest_sequence = report.highest_sequence.max(record.sequence);
                report.log_records_checked += 1;
                logs.push(record);
            }
            Some(Ok(None)) => {}
            _ => violations.push(format!("log slot {slot} (block {lba}): bad checksum")),
        }
    }
    if report.total_balance != report.expected_total_balance {
        violations.push(format!(
            "balances add up to {} instead of {}",
            report.total_balance, report.expected_total_balance
        ));
    }
    let account = |id: u32| accounts.get(id as usize).copied().flatten();
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
                Some(a) if a.last_sequence == record.sequence && a.balance != balance => violations
                    .push(format!(
                        "transaction {}: account {id} holds {} but the log says {balance}",
                        record.sequence, a.balance
                    )),
                None if id >= layout.accounts => violations.push(format!(
                    "transaction {} names account {id}, beyond the {} accounts",
                    record.sequence, layout.accounts
                )),
                _ => {}
            }
        }
    }
    // An account written by a transaction whose log record is still in the
    // ring: the other account must have reached that sequence too.
    for a in accounts.iter().flatten() {
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
    if let Some(expected) = expected_sequence
        && report.highest_sequence != expected
    {
        violations.push(format!(
            "highest sequence is {} but the snapshot was taken at {expected}",
            report.highest_sequence
        ));
    }
    let total = violations.len();
    violations.truncate(MAX_LISTED_VIOLATIONS);
    if total > MAX_LISTED_VIOLATIONS {
        violations.push(format!("… and {} more", total - MAX_LISTED_VIOLATIONS));
    }
    report.ok = violations.is_empty();
    report.violations = violations;
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
