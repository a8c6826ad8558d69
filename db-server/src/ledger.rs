//! The ledger database (1515): accounts on the data volume of one pair,
//! transactions that move money between two of them, and the workers that
//! run transactions at a configured rate. Every block goes through the
//! snapshot manager's write path, as a real database's would.
//!
//! # Crash consistency (DESIGN §3 rule 6)
//!
//! A transaction's log record is its redo: it carries both post-images
//! (see [`crate::ledger_format`]). A transaction
//!
//! 1. takes both account locks (in id order) and then its sequence, so the
//!    transactions of one account run one at a time in sequence order;
//! 2. waits until the log slot it will use is free (below);
//! 3. writes its log block and waits for the array's acknowledgement;
//! 4. writes both account blocks (side by side) and waits for both;
//! 5. only then updates memory, releases the locks and answers `Ok`.
//!
//! So an account that is behind a logged sequence naming it was written
//! neither by that transaction nor by any later one, and the record's
//! post-image is exactly what the transaction would have written. Opening
//! the ledger reads the accounts and the ring, redoes (in sequence order)
//! every logged transaction whose accounts are behind it, writes the
//! repaired account blocks, logs how many transactions it redid, and then
//! runs the image verifier's strict check on the result: if that fails the
//! ledger refuses to open (and db-server to start; after a restore, the
//! ledger stays stopped, see [`crate::ledger_slot`]) rather than run on a
//! broken ledger.
//!
//! **What "durable" means here.** The array acknowledges a write once both
//! sides of the mirror LU hold it in the array-node's files (the page cache
//! of its host). That survives `kill -9` of db-server and of array-node,
//! which is what the ledger relies on: the array stands for a disk array
//! whose cache is nonvolatile. Surviving a power loss of the array's host
//! would need the log write to be durable on the media before the account
//! writes — the write flagged FUA (or a Flush of the LU) — which the
//! snapshot manager's write path does not offer today; with it the cost
//! would be one sync of both sides per transaction, worth a group commit.
//! Not offered. A block is written by one `pwrite`, which a process kill
//! does not tear; a power loss could, and a torn block then fails its
//! checksum and the open refuses.
//!
//! **The ring.** The log slot of sequence `S` is reused by `S + log_blocks`.
//! A transaction waits until every sequence up to `S + log_blocks` minus
//! `log_blocks` has its accounts written (the `applied` watermark) before it
//! writes its log block, so a slot is never overwritten while the redo it
//! holds may still be needed — and never while an earlier log write to that
//! slot is still in flight. Sequences lower than ours already hold their
//! locks, so the wait cannot deadlock.
//!
//! **A transaction that cannot finish.** Once a log write has been sent its
//! transaction may be on the volume, so it must not be abandoned while
//! later transactions go on: they could build on balances that the redo
//! later overwrites. If one ends between sending its log block and writing
//! both accounts (shutdown while the array fails, or its future dropped),
//! the ledger stops taking transactions; restarting db-server redoes it.
//!
//! **Sequences.** The open continues from the highest sequence on the
//! volume, so no acknowledged sequence is reused. A transaction that had
//! its sequence but whose log block never reached the array leaves a gap;
//! it was never acknowledged, and its number may be handed out again.
//! [`LedgerStatus::committed_sequence`] is the highest sequence such that
//! every sequence up to it has its redo acknowledged by the array: after
//! any crash the reopened ledger's sequence is at least that.

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use tokio::sync::{Mutex, watch};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::error::DbError;
use crate::gate::QuiesceGate;
use crate::latency::LatencyHistogram;
use crate::ledger_format::{self, Account, Layout, LedgerBlocks, LogRecord, Superblock};
use crate::lu_status::VirtualLu;
use crate::manager::SnapshotManager;

/// Why the ledger would not open or would not take a transaction.
#[derive(Debug, thiserror::Error)]
pub enum LedgerError {
    /// The volume is too small for the accounts and a log (or fewer than
    /// two accounts were asked for). Not retryable; configure less.
    #[error("{accounts} accounts and a log do not fit on volume {volume} ({block_count} blocks)")]
    DoesNotFit {
        accounts: u32,
        volume: u32,
        block_count: u64,
    },
    /// The volume holds data that is not a ledger: never formatted over.
    /// Not retryable.
    #[error(
        "volume {volume} holds something that is not a valid ledger; refusing to format over it"
    )]
    Foreign { volume: u32 },
    /// After redo the ledger fails its own check (balance, checksums): a
    /// damaged image. Not retryable; db-server refuses to run on it.
    #[error(
        "the ledger on volume {volume} fails its own check after redoing {redone} transactions; \
         refusing to run on it: {}",
        violations.join("; ")
    )]
    FailsCheck {
        volume: u32,
        redone: u64,
        violations: Vec<String>,
    },
    /// An account block failed its checksum at open. Not retryable.
    #[error("account {account} on volume {volume} has a bad checksum")]
    BadAccount { volume: u32, account: usize },
    /// A write of a transaction could not be completed, so the ledger
    /// stopped taking transactions (the reason says which write). Not
    /// retryable until db-server is restarted and redoes the log.
    #[error("the ledger has stopped taking transactions: {why}")]
    Stopped { why: String },
}

/// The ledger's settings.
#[derive(Debug, Clone)]
pub struct LedgerConfig {
    pub volume: u32,
    pub accounts: u32,
    /// Transactions per second over all workers; 0 = as fast as they go.
    pub target_tps: u32,
    pub workers: u32,
    pub initial_balance: i64,
    /// Log ring size in blocks (capped to what fits on the volume).
    pub log_blocks: u64,
    /// Switches that break the ledger on purpose (tests only).
    #[cfg(any(test, feature = "testing"))]
    pub hooks: LedgerTestHooks,
}

impl Default for LedgerConfig {
    fn default() -> Self {
        Self {
            volume: 0,
            accounts: 1000,
            target_tps: 0,
            workers: 8,
            initial_balance: 1_000_000,
            log_blocks: 4096,
            #[cfg(any(test, feature = "testing"))]
            hooks: LedgerTestHooks::default(),
        }
    }
}

impl LedgerConfig {
    /// Whether a transaction's log and account blocks are written side by
    /// side, with no redo and no check on open: never, unless a test hook
    /// breaks the ledger on purpose.
    fn writes_side_by_side(&self) -> bool {
        #[cfg(any(test, feature = "testing"))]
        if self.hooks.writes_side_by_side {
            return true;
        }
        false
    }
}

/// Switches that break the ledger on purpose, so that the crash tests can
/// show they catch it. Compiled only for tests and the `testing` feature.
#[cfg(any(test, feature = "testing"))]
#[derive(Debug, Clone, Copy, Default)]
pub struct LedgerTestHooks {
    /// The order before crash consistency: the log block and both account
    /// blocks written side by side, and an open that neither redoes nor
    /// checks.
    pub writes_side_by_side: bool,
}

/// Counters for `Status`.
#[derive(Debug, Clone, Default)]
pub struct LedgerStatus {
    pub volume: u32,
    /// The highest sequence handed out.
    pub sequence: u64,
    /// The highest sequence such that every sequence up to it has its redo
    /// acknowledged by the array: none of them is lost by a crash.
    pub committed_sequence: u64,
    pub committed: u64,
    pub failed_writes: u64,
    pub accounts: u32,
    /// Transactions the open redid (a crash had left them logged but not
    /// applied).
    pub redone_at_open: u64,
    /// Whether it takes transactions: open, and not stopped (by a restore,
    /// see [`crate::ledger_slot`], or by a transaction it could not
    /// finish).
    pub running: bool,
    /// Why the ledger stopped taking transactions, if it did.
    pub stopped: Option<String>,
    /// Cumulative transaction latency histogram (see [`crate::latency`]).
    pub latency_histogram: Vec<u64>,
}

pub struct Ledger {
    manager: Arc<SnapshotManager>,
    gate: Arc<QuiesceGate>,
    volume: u32,
    layout: Layout,
    /// The broken order of a test hook (see `LedgerConfig::hooks`); always
    /// false in a production build.
    writes_side_by_side: bool,
    accounts: Vec<Mutex<Account>>,
    /// The last sequence handed out. Once the gate is quiesced every handed
    /// out sequence is committed, so this is the sequence of a snapshot.
    sequence: AtomicU64,
    /// Every sequence up to this has its log block acknowledged.
    durable: Watermark,
    /// Every sequence up to this has its account blocks acknowledged: the
    /// log slots of those sequences may be reused.
    applied: Watermark,
    /// Set once a transaction ended between its log write and its account
    /// writes; the ledger then takes no more transactions.
    stopped: OnceLock<String>,
    committed: AtomicU64,
    failed_writes: AtomicU64,
    redone_at_open: u64,
    /// Time from asking to start a transaction to its commit, as a client
    /// sees it (waiting at a closed gate included).
    latency: LatencyHistogram,
}

impl Ledger {
    /// Opens the ledger on the volume, formatting it only if the volume has
    /// never held one (block 0 all zeros). An existing ledger is repaired
    /// (the redo of what a crash tore), checked, and continues from its
    /// highest sequence; one that fails the check is refused.
    pub async fn open(
        manager: Arc<SnapshotManager>,
        gate: Arc<QuiesceGate>,
        config: &LedgerConfig,
    ) -> Result<Arc<Self>, DbError> {
        let pair = manager.pair(config.volume)?;
        let read = |lba, blocks| manager.read(config.volume, VirtualLu::Data, lba, blocks);
        let superblock = ledger_format::decode_superblock(&read(0, 1).await?);
        let (layout, accounts, sequence, redone_at_open) = match superblock {
            Superblock::Ledger(layout) => {
                let (accounts, sequence, redone) = Self::recover(
                    &manager,
                    config.volume,
                    &layout,
                    config.writes_side_by_side(),
                )
                .await?;
                tracing::info!(
                    volume = config.volume,
                    accounts = layout.accounts,
                    "opened the existing ledger at sequence {sequence}: redid {redone} \
                     transactions a crash had left logged but not applied"
                );
                (layout, accounts, sequence, redone)
            }
            Superblock::Empty => {
                let room = pair
                    .block_count
                    .saturating_sub(1 + u64::from(config.accounts));
                let layout = Layout {
                    block_size_bytes: pair.block_size_bytes,
                    accounts: config.accounts,
                    initial_balance: config.initial_balance,
                    log_blocks: config.log_blocks.min(room),
                };
                if layout.log_blocks == 0 || config.accounts < 2 {
                    return Err(LedgerError::DoesNotFit {
                        accounts: config.accounts,
                        volume: config.volume,
                        block_count: pair.block_count,
                    }
                    .into());
                }
                let accounts = Self::format(&manager, config.volume, &layout).await?;
                tracing::info!(
                    volume = config.volume,
                    accounts = layout.accounts,
                    "formatted a new ledger"
                );
                (layout, accounts, 0, 0)
            }
            Superblock::Foreign => {
                return Err(LedgerError::Foreign {
                    volume: config.volume,
                }
                .into());
            }
        };
        Ok(Arc::new(Self {
            manager,
            gate,
            volume: config.volume,
            layout,
            writes_side_by_side: config.writes_side_by_side(),
            accounts: accounts.into_iter().map(Mutex::new).collect(),
            sequence: AtomicU64::new(sequence),
            durable: Watermark::new(sequence),
            applied: Watermark::new(sequence),
            stopped: OnceLock::new(),
            committed: AtomicU64::new(0),
            failed_writes: AtomicU64::new(0),
            redone_at_open,
            latency: LatencyHistogram::default(),
        }))
    }

    async fn format(
        manager: &SnapshotManager,
        volume: u32,
        layout: &Layout,
    ) -> Result<Vec<Account>, DbError> {
        let bs = layout.block_size_bytes;
        let accounts: Vec<Account> = (0..layout.accounts)
            .map(|id| Account {
                id,
                balance: layout.initial_balance,
                last_sequence: 0,
            })
            .collect();
        // Accounts and an empty log first, the superblock last: a crash
        // mid-format leaves a volume that is formatted again next time.
        const BATCH_BLOCKS: usize = 256;
        for batch in accounts.chunks(BATCH_BLOCKS) {
            let mut data = Vec::with_capacity(batch.len() * bs as usize);
            for account in batch {
                data.extend_from_slice(&ledger_format::encode_account(account, bs));
            }
            let lba = layout.account_lba(batch[0].id);
            manager.write(volume, VirtualLu::Data, lba, data).await?;
        }
        let mut slot = 0;
        while slot < layout.log_blocks {
            let n = (layout.log_blocks - slot).min(BATCH_BLOCKS as u64);
            let zeros = vec![0u8; (n * u64::from(bs)) as usize];
            let lba = layout.log_start_lba() + slot;
            manager.write(volume, VirtualLu::Data, lba, zeros).await?;
            slot += n;
        }
        let superblock = ledger_format::encode_superblock(layout);
        manager
            .write(volume, VirtualLu::Data, 0, superblock)
            .await?;
        Ok(accounts)
    }

    /// Reads the accounts and the log ring, redoes what a crash left logged
    /// but not applied (writing the repaired account blocks), and checks
    /// the result. Answers the accounts, the highest sequence and how many
    /// transactions were redone.
    async fn recover(
        manager: &SnapshotManager,
        volume: u32,
        layout: &Layout,
        writes_side_by_side: bool,
    ) -> Result<(Vec<Account>, u64, u64), DbError> {
        let account_bytes = manager
            .read(
                volume,
                VirtualLu::Data,
                layout.account_lba(0),
                u64::from(layout.accounts),
            )
            .await?;
        let log_bytes = manager
            .read(
                volume,
                VirtualLu::Data,
                layout.log_start_lba(),
                layout.log_blocks,
            )
            .await?;
        let mut blocks = LedgerBlocks::decode(*layout, &account_bytes, &log_bytes);
        let mut redone = 0;
        if !writes_side_by_side {
            let redo = blocks.redo();
            let bs = layout.block_size_bytes;
            // Any order will do: the log records stay until these are
            // acknowledged, so a crash in the middle is redone the same way.
            for account in &redo.accounts {
                manager
                    .write(
                        volume,
                        VirtualLu::Data,
                        layout.account_lba(account.id),
                        ledger_format::encode_account(account, bs),
                    )
                    .await?;
            }
            redone = redo.transactions;
            let report = blocks.check(None);
            if !report.ok {
                return Err(LedgerError::FailsCheck {
                    volume,
                    redone,
                    violations: report.violations,
                }
                .into());
            }
        }
        let sequence = blocks.highest_sequence();
        let accounts = blocks
            .accounts
            .iter()
            .enumerate()
            .map(|(id, account)| {
                account.ok_or(DbError::Ledger(LedgerError::BadAccount {
                    volume,
                    account: id,
                }))
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok((accounts, sequence, redone))
    }

    pub fn volume(&self) -> u32 {
        self.volume
    }

    pub fn layout(&self) -> Layout {
        self.layout
    }

    /// The highest sequence handed out (= committed once quiesced).
    pub fn sequence(&self) -> u64 {
        self.sequence.load(Ordering::SeqCst)
    }

    /// The highest sequence such that every sequence up to it has its redo
    /// acknowledged by the array.
    pub fn committed_sequence(&self) -> u64 {
        self.durable.get()
    }

    pub fn status(&self) -> LedgerStatus {
        LedgerStatus {
            volume: self.volume,
            sequence: self.sequence(),
            committed_sequence: self.committed_sequence(),
            committed: self.committed.load(Ordering::Relaxed),
            failed_writes: self.failed_writes.load(Ordering::Relaxed),
            accounts: self.layout.accounts,
            redone_at_open: self.redone_at_open,
            running: self.stopped.get().is_none(),
            stopped: self.stopped.get().cloned(),
            latency_histogram: self.latency.snapshot(),
        }
    }

    fn refuse_if_stopped(&self) -> Result<(), DbError> {
        match self.stopped.get() {
            Some(why) => Err(LedgerError::Stopped { why: why.clone() }.into()),
            None => Ok(()),
        }
    }

    /// Stops the ledger: no transaction starts after this. Wakes those
    /// waiting for a log slot, which may never come free now.
    fn stop(&self, why: String) {
        if self.stopped.set(why.clone()).is_ok() {
            tracing::error!(volume = self.volume, "the ledger stops: {why}");
        }
        self.applied.wake();
    }

    /// One transaction: moves `amount` from one account to another — its
    /// log block first, then both account blocks (see the module docs). A
    /// failed write is retried until it succeeds (or shutdown): a
    /// transaction is never left torn by choice.
    pub async fn transfer(
        &self,
        from: u32,
        to: u32,
        amount: i64,
        cancel: &CancellationToken,
    ) -> Result<u64, DbError> {
        if from == to || from >= self.layout.accounts || to >= self.layout.accounts {
            return Err(DbError::InvalidArgument(format!(
                "cannot transfer from account {from} to account {to}"
            )));
        }
        let asked = std::time::Instant::now();
        let _pass = tokio::select! {
            pass = self.gate.pass() => pass,
            () = cancel.cancelled() => return Err(DbError::ShuttingDown),
        };
        self.refuse_if_stopped()?;
        // Lock in id order so two transfers never wait on each other.
        let (first, second) = (from.min(to), from.max(to));
        let mut first_guard = self.accounts[first as usize].lock().await;
        let mut second_guard = self.accounts[second as usize].lock().await;
        // A transaction that stopped the ledger released these locks
        // without applying itself: nothing may build on them now.
        self.refuse_if_stopped()?;
        let (from_account, to_account) = if from == first {
            (&mut *first_guard, &mut *second_guard)
        } else {
            (&mut *second_guard, &mut *first_guard)
        };
        let sequence = self.sequence.fetch_add(1, Ordering::SeqCst) + 1;
        let mut in_flight = InFlight {
            ledger: self,
            sequence,
            stage: Stage::Assigned,
        };
        let mut new_from = *from_account;
        let mut new_to = *to_account;
        new_from.balance -= amount;
        new_to.balance += amount;
        new_from.last_sequence = sequence;
        new_to.last_sequence = sequence;
        let record = LogRecord {
            sequence,
            from,
            to,
            amount,
            from_balance: new_from.balance,
            to_balance: new_to.balance,
        };
        // The slot is free once the transaction that used it last has its
        // accounts written.
        if let Some(previous) = sequence.checked_sub(self.layout.log_blocks) {
            tokio::select! {
                () = self.applied.wait_for(previous, || self.stopped.get().is_some()) => {}
                () = cancel.cancelled() => return Err(DbError::ShuttingDown),
            }
            self.refuse_if_stopped()?;
        }
        let bs = self.layout.block_size_bytes;
        let log = self.write_until_done(
            self.layout.log_lba(sequence),
            ledger_format::encode_log(&record, bs),
            cancel,
        );
        let from_write = self.write_until_done(
            self.layout.account_lba(from),
            ledger_format::encode_account(&new_from, bs),
            cancel,
        );
        let to_write = self.write_until_done(
            self.layout.account_lba(to),
            ledger_format::encode_account(&new_to, bs),
            cancel,
        );
        in_flight.stage = Stage::LogSent;
        if self.writes_side_by_side {
            let (l, a, b) = tokio::join!(log, from_write, to_write);
            l?;
            a?;
            b?;
        } else {
            log.await?;
            in_flight.log_durable();
            let (a, b) = tokio::join!(from_write, to_write);
            a?;
            b?;
        }
        *from_account = new_from;
        *to_account = new_to;
        in_flight.applied();
        self.committed.fetch_add(1, Ordering::Relaxed);
        splitmirror_proto::telemetry::record_ledger_transactions(1);
        self.latency.record(asked.elapsed().as_micros() as u64);
        Ok(sequence)
    }

    async fn write_until_done(
        &self,
        lba: u64,
        block: Vec<u8>,
        cancel: &CancellationToken,
    ) -> Result<(), DbError> {
        let mut backoff = Duration::from_millis(10);
        loop {
            match self
                .manager
                .write(self.volume, VirtualLu::Data, lba, block.clone())
                .await
            {
                Ok(_) => return Ok(()),
                Err(error) => {
                    self.failed_writes.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(
                        "ledger write at LBA {lba} failed, retrying in {backoff:?}: {error}"
                    );
                    tokio::select! {
                        () = tokio::time::sleep(backoff) => {}
                        () = cancel.cancelled() => return Err(DbError::ShuttingDown),
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(1));
                }
            }
        }
    }

    /// Starts `config.workers` workers that run random transfers until
    /// `cancel`, paced to `config.target_tps` in total (0 = unpaced).
    pub fn start_workload(
        self: &Arc<Self>,
        config: &LedgerConfig,
        cancel: CancellationToken,
        tasks: &TaskTracker,
    ) {
        let workers = config.workers.max(1);
        let interval = (config.target_tps > 0)
            .then(|| Duration::from_secs_f64(f64::from(workers) / f64::from(config.target_tps)));
        for worker in 0..workers {
            let ledger = self.clone();
            let cancel = cancel.clone();
            tasks.spawn(async move {
                let mut rng = SmallRng::seed_from_u64(u64::from(worker) ^ 0x5EED);
                let mut ticker = interval.map(|every| {
                    let mut t = tokio::time::interval(every);
                    t.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                    t
                });
                let accounts = ledger.layout.accounts;
                loop {
                    if let Some(ticker) = &mut ticker {
                        tokio::select! {
                            _ = ticker.tick() => {}
                            () = cancel.cancelled() => return,
                        }
                    }
                    if cancel.is_cancelled() {
                        return;
                    }
                    if ledger.stopped.get().is_some() {
                        // Said once, by `stop`; a restart repairs it.
                        tokio::select! {
                            () = tokio::time::sleep(Duration::from_secs(1)) => continue,
                            () = cancel.cancelled() => return,
                        }
                    }
                    let from = rng.random_range(0..accounts);
                    let to = (from + rng.random_range(1..accounts)) % accounts;
                    let amount = rng.random_range(1..=100);
                    // Not raced against `cancel`: dropping a transfer halfway
                    // would stop the ledger. It gives up by itself only
                    // between retries of a failing write.
                    if let Err(error) = ledger.transfer(from, to, amount, &cancel).await
                        && !cancel.is_cancelled()
                    {
                        tracing::warn!("transaction failed: {error}");
                    }
                }
            });
        }
    }
}

/// Where a transaction is between taking its sequence and answering.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stage {
    /// Nothing written yet.
    Assigned,
    /// The log write has been sent: the transaction may be on the volume.
    LogSent,
    /// The log block is acknowledged; the account writes are on their way.
    LogDurable,
    /// Both account blocks are acknowledged.
    Applied,
}

/// Moves the watermarks as a transaction goes, and stops the ledger if the
/// transaction ends (an error, or its future dropped) after its log write
/// was sent but before its accounts were written.
struct InFlight<'a> {
    ledger: &'a Ledger,
    sequence: u64,
    stage: Stage,
}

impl InFlight<'_> {
    fn log_durable(&mut self) {
        self.ledger.durable.complete(self.sequence);
        self.stage = Stage::LogDurable;
    }

    fn applied(&mut self) {
        if self.stage != Stage::LogDurable {
            self.ledger.durable.complete(self.sequence);
        }
        self.ledger.applied.complete(self.sequence);
        self.stage = Stage::Applied;
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        match self.stage {
            // Never written: a gap that no one acknowledged. Its slot was
            // not touched, so later ones may use theirs; but it is not
            // durable, so the committed sequence stays below it (only
            // shutdown or a stop ends a transaction here, and a restart
            // starts both watermarks afresh).
            Stage::Assigned => self.ledger.applied.complete(self.sequence),
            Stage::Applied => {}
            Stage::LogSent | Stage::LogDurable => self.ledger.stop(format!(
                "transaction {} ended after its log write was sent but before both of its \
                 accounts were written (shutdown while the array failed, or its caller gave \
                 up); restarting db-server redoes it",
                self.sequence
            )),
        }
    }
}

/// The highest sequence such that every sequence up to it is done, with the
/// ones done early kept aside until the gap below them closes.
struct Watermark {
    ahead: std::sync::Mutex<BTreeSet<u64>>,
    through: watch::Sender<u64>,
}

impl Watermark {
    fn new(through: u64) -> Self {
        Self {
            ahead: std::sync::Mutex::new(BTreeSet::new()),
            through: watch::Sender::new(through),
        }
    }

    fn get(&self) -> u64 {
        *self.through.borrow()
    }

    fn complete(&self, sequence: u64) {
        let mut ahead = self.ahead.lock().expect("watermark lock poisoned");
        let mut through = self.get();
        if sequence != through + 1 {
            ahead.insert(sequence);
            return;
        }
        through = sequence;
        while ahead.remove(&(through + 1)) {
            through += 1;
        }
        self.through.send_replace(through);
    }

    /// Waits until the watermark reaches `at_least`, or `give_up` says so
    /// (checked whenever the watermark moves or [`Self::wake`] is called).
    async fn wait_for(&self, at_least: u64, give_up: impl Fn() -> bool) {
        if self.get() >= at_least {
            return;
        }
        let mut through = self.through.subscribe();
        // The sender lives in `self`, so the wait cannot fail for want of
        // one; if it did, the caller re-checks what it waited for anyway.
        let _ = through
            .wait_for(|&through| through >= at_least || give_up())
            .await;
    }

    /// Makes the waiters look at `give_up` again.
    fn wake(&self) {
        self.through.send_modify(|_| {});
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::array_port::{MemoryArray, PairInfo};
    use crate::manager::ManagerConfig;

    const PAIR: PairInfo = PairInfo {
        mirror_lu: 0,
        origin_lu: 1,
        mate_lu: 2,
        block_size_bytes: 512,
        block_count: 64,
    };

    fn config() -> LedgerConfig {
        LedgerConfig {
            accounts: 8,
            initial_balance: 1_000,
            log_blocks: 16,
            ..LedgerConfig::default()
        }
    }

    fn start() -> (Arc<SnapshotManager>, Arc<MemoryArray>) {
        let array = Arc::new(MemoryArray::new(vec![PAIR]));
        let manager = futures_util::FutureExt::now_or_never(SnapshotManager::start(
            array.clone(),
            vec![PAIR],
            None,
            ManagerConfig::default(),
            CancellationToken::new(),
            TaskTracker::new(),
        ))
        .expect("without a journal the start does not wait")
        .expect("start");
        (manager, array)
    }

    async fn open(
        manager: &Arc<SnapshotManager>,
        config: &LedgerConfig,
    ) -> Result<Arc<Ledger>, DbError> {
        let gate = Arc::new(QuiesceGate::new(TaskTracker::new()));
        Ledger::open(manager.clone(), gate, config).await
    }

    /// A ledger that ran 40 transfers, through its 16-slot ring twice.
    async fn busy_ledger() -> (Arc<SnapshotManager>, Arc<MemoryArray>, Arc<Ledger>) {
        let (manager, array) = start();
        let ledger = open(&manager, &config()).await.expect("format");
        let cancel = CancellationToken::new();
        for i in 0..40u32 {
            let sequence = ledger
                .transfer(i % 8, (i * 3 + 1) % 8, i64::from(i) + 1, &cancel)
                .await
                .expect("transfer");
            assert_eq!(sequence, u64::from(i) + 1);
        }
        assert_eq!(ledger.committed_sequence(), 40);
        (manager, array, ledger)
    }

    /// Writes what transaction `sequence` (0 → 1, 7 units) would write, as
    /// a crash leaves it: its log block, and account 0 if `from_written`.
    async fn tear(ledger: &Ledger, sequence: u64, log: bool, from_written: bool) {
        let bs = ledger.layout.block_size_bytes;
        let mut from = *ledger.accounts[0].lock().await;
        let mut to = *ledger.accounts[1].lock().await;
        from.balance -= 7;
        to.balance += 7;
        from.last_sequence = sequence;
        to.last_sequence = sequence;
        let record = LogRecord {
            sequence,
            from: 0,
            to: 1,
            amount: 7,
            from_balance: from.balance,
            to_balance: to.balance,
        };
        let write = |lba, block| ledger.manager.write(0, VirtualLu::Data, lba, block);
        if log {
            write(
                ledger.layout.log_lba(sequence),
                ledger_format::encode_log(&record, bs),
            )
            .await
            .expect("write log");
        }
        if from_written {
            write(
                ledger.layout.account_lba(0),
                ledger_format::encode_account(&from, bs),
            )
            .await
            .expect("write account");
        }
    }

    #[tokio::test]
    async fn a_clean_ledger_reopens_with_nothing_to_redo() {
        let (manager, array, ledger) = busy_ledger().await;
        drop(ledger);
        let ledger = open(&manager, &config()).await.expect("reopen");
        assert_eq!(ledger.status().redone_at_open, 0);
        assert_eq!(ledger.sequence(), 40);
        assert_eq!(ledger.committed_sequence(), 40);
        let report = ledger_format::verify_image(&array.lu(1), Some(40));
        assert!(report.ok, "{:?}", report.violations);
    }

    #[tokio::test]
    async fn open_redoes_a_transaction_torn_between_its_accounts() {
        let (manager, array, ledger) = busy_ledger().await;
        tear(&ledger, 41, true, true).await;
        drop(ledger);
        let before = ledger_format::verify_image(&array.lu(1), Some(41));
        assert!(!before.ok, "the torn image fails the strict check");
        assert_eq!(before.redo_pending, 1);
        assert!(before.ok_after_redo, "{:?}", before.violations);
        let ledger = open(&manager, &config()).await.expect("reopen repairs it");
        assert_eq!(ledger.status().redone_at_open, 1);
        assert_eq!(ledger.sequence(), 41);
        assert_eq!(ledger.committed_sequence(), 41);
        for lu in [1, 2] {
            let report = ledger_format::verify_image(&array.lu(lu), Some(41));
            assert!(report.ok, "LU {lu}: {:?}", report.violations);
        }
        // And it goes on from there, through the slot of 41 and beyond.
        let cancel = CancellationToken::new();
        for i in 0..20 {
            ledger
                .transfer(1, 2, 1 + i, &cancel)
                .await
                .expect("transfer");
        }
        let report = ledger_format::verify_image(&array.lu(1), Some(61));
        assert!(report.ok, "{:?}", report.violations);
    }

    #[tokio::test]
    async fn open_redoes_a_logged_transaction_with_no_account_written() {
        let (manager, array, ledger) = busy_ledger().await;
        tear(&ledger, 41, true, false).await;
        drop(ledger);
        let ledger = open(&manager, &config()).await.expect("reopen");
        assert_eq!(ledger.status().redone_at_open, 1);
        assert!(ledger_format::verify_image(&array.lu(1), Some(41)).ok);
    }

    #[tokio::test]
    async fn open_refuses_a_ledger_the_redo_cannot_repair() {
        // An account written without its log record: the order the ledger
        // no longer uses, so only damage makes it.
        let (manager, _array, ledger) = busy_ledger().await;
        tear(&ledger, 41, false, true).await;
        drop(ledger);
        let error = match open(&manager, &config()).await {
            Ok(_) => panic!("a broken ledger must not open"),
            Err(e) => e.to_string(),
        };
        assert!(error.contains("refusing to run"), "{error}");
        assert!(error.contains("add up to"), "{error}");
        // The canary's open checks nothing and runs on it.
        let mut unsafe_config = config();
        unsafe_config.hooks.writes_side_by_side = true;
        assert!(open(&manager, &unsafe_config).await.is_ok());
    }

    #[tokio::test]
    async fn a_transaction_abandoned_after_sending_its_log_stops_the_ledger() {
        let (_manager, array, ledger) = busy_ledger().await;
        array
            .fail_writes
            .store(true, std::sync::atomic::Ordering::SeqCst);
        let cancel = CancellationToken::new();
        let stopper = cancel.clone();
        let canceller = tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(50)).await;
            stopper.cancel();
        });
        let result = ledger.transfer(0, 1, 5, &cancel).await;
        canceller.await.expect("canceller");
        assert!(matches!(result, Err(DbError::ShuttingDown)), "{result:?}");
        let status = ledger.status();
        assert!(status.stopped.is_some(), "{status:?}");
        assert_eq!(status.committed_sequence, 40, "41 never became durable");
        array
            .fail_writes
            .store(false, std::sync::atomic::Ordering::SeqCst);
        let error = ledger
            .transfer(2, 3, 5, &CancellationToken::new())
            .await
            .expect_err("a stopped ledger refuses transactions");
        assert!(error.to_string().contains("stopped"), "{error}");
    }
}
