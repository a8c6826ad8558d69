//! The ledger database (1515): accounts on the data volume of one pair,
//! transactions that move money between two of them, and the workers that
//! run transactions at a configured rate. Every block goes through the
//! snapshot manager's write path, as a real database's would.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use tokio::sync::Mutex;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::error::DbError;
use crate::gate::QuiesceGate;
use crate::latency::LatencyHistogram;
use crate::ledger_format::{self, Account, Layout, LogRecord, Superblock};
use crate::lu_status::VirtualLu;
use crate::manager::SnapshotManager;

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
        }
    }
}

/// Counters for `Status`.
#[derive(Debug, Clone, Default)]
pub struct LedgerStatus {
    pub volume: u32,
    pub sequence: u64,
    pub committed: u64,
    pub failed_writes: u64,
    pub accounts: u32,
    /// Cumulative transaction latency histogram (see [`crate::latency`]).
    pub latency_histogram: Vec<u64>,
}

pub struct Ledger {
    manager: Arc<SnapshotManager>,
    gate: Arc<QuiesceGate>,
    volume: u32,
    layout: Layout,
    accounts: Vec<Mutex<Account>>,
    /// The last sequence handed out. Once the gate is quiesced every handed
    /// out sequence is committed, so this is the sequence of a snapshot.
    sequence: AtomicU64,
    committed: AtomicU64,
    failed_writes: AtomicU64,
    /// Time from asking to start a transaction to its commit, as a client
    /// sees it (waiting at a closed gate included).
    latency: LatencyHistogram,
}

impl Ledger {
    /// Opens the ledger on the volume, formatting it only if the volume has
    /// never held one (block 0 all zeros). An existing ledger continues from
    /// its highest sequence.
    pub async fn open(
        manager: Arc<SnapshotManager>,
        gate: Arc<QuiesceGate>,
        config: &LedgerConfig,
    ) -> Result<Arc<Self>, DbError> {
        let pair = manager.pair(config.volume)?;
        let read = |lba, blocks| manager.read(config.volume, VirtualLu::Data, lba, blocks);
        let superblock = ledger_format::decode_superblock(&read(0, 1).await?);
        let (layout, accounts, sequence) = match superblock {
            Superblock::Ledger(layout) => {
                let (accounts, sequence) = Self::load(&manager, config.volume, &layout).await?;
                tracing::info!(
                    volume = config.volume,
                    accounts = layout.accounts,
                    sequence,
                    "opened the existing ledger"
                );
                (layout, accounts, sequence)
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
                    return Err(DbError::Ledger(format!(
                        "{} accounts and a log do not fit on volume {} ({} blocks)",
                        config.accounts, config.volume, pair.block_count
                    )));
                }
                let accounts = Self::format(&manager, config.volume, &layout).await?;
                tracing::info!(
                    volume = config.volume,
                    accounts = layout.accounts,
                    "formatted a new ledger"
                );
                (layout, accounts, 0)
            }
            Superblock::Foreign => {
                return Err(DbError::Ledger(format!(
                    "volume {} holds something that is not a valid ledger; refusing to format over it",
                    config.volume
                )));
            }
        };
        Ok(Arc::new(Self {
            manager,
            gate,
            volume: config.volume,
            layout,
            accounts: accounts.into_iter().map(Mutex::new).collect(),
            sequence: AtomicU64::new(sequence),
            committed: AtomicU64::new(0),
            failed_writes: AtomicU64::new(0),
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

    async fn load(
        manager: &SnapshotManager,
        volume: u32,
        layout: &Layout,
    ) -> Result<(Vec<Account>, u64), DbError> {
        let bs = layout.block_size_bytes as usize;
        let data = manager
            .read(volume, VirtualLu::Data, 1, u64::from(layout.accounts))
            .await?;
        let mut accounts = Vec::with_capacity(layout.accounts as usize);
        let mut sequence = 0;
        for (id, block) in data.chunks(bs).enumerate() {
            let account = ledger_format::decode_account(block)
                .filter(|a| a.id as usize == id)
                .ok_or_else(|| DbError::Ledger(format!("account {id} has a bad checksum")))?;
            sequence = sequence.max(account.last_sequence);
            accounts.push(account);
        }
        let log = manager
            .read(
                volume,
                VirtualLu::Data,
                layout.log_start_lba(),
                layout.log_blocks,
            )
            .await?;
        for block in log.chunks(bs) {
            if let Ok(Some(record)) = ledger_format::decode_log(block) {
                sequence = sequence.max(record.sequence);
            }
        }
        Ok((accounts, sequence))
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

    pub fn status(&self) -> LedgerStatus {
        LedgerStatus {
            volume: self.volume,
            sequence: self.sequence(),
            committed: self.committed.load(Ordering::Relaxed),
            failed_writes: self.failed_writes.load(Ordering::Relaxed),
            accounts: self.layout.accounts,
            latency_histogram: self.latency.snapshot(),
        }
    }

    /// One transaction: moves `amount` from one account to another, writing
    /// both account blocks and a log block. A failed write is retried until
    /// it succeeds (or shutdown): a transaction is never left torn by choice.
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
        // Lock in id order so two transfers never wait on each other.
        let (first, second) = (from.min(to), from.max(to));
        let mut first_guard = self.accounts[first as usize].lock().await;
        let mut second_guard = self.accounts[second as usize].lock().await;
        let (from_account, to_account) = if from == first {
            (&mut *first_guard, &mut *second_guard)
        } else {
            (&mut *second_guard, &mut *first_guard)
        };
        let sequence = self.sequence.fetch_add(1, Ordering::SeqCst) + 1;
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
        let bs = self.layout.block_size_bytes;
        let writes = [
            (
                self.layout.account_lba(from),
                ledger_format::encode_account(&new_from, bs),
            ),
            (
                self.layout.account_lba(to),
                ledger_format::encode_account(&new_to, bs),
            ),
            (
                self.layout.log_lba(sequence),
                ledger_format::encode_log(&record, bs),
            ),
        ];
        let [a, b, c] = writes.map(|(lba, block)| self.write_until_done(lba, block, cancel));
        let (a, b, c) = tokio::join!(a, b, c);
        a?;
        b?;
        c?;
        *from_account = new_from;
        *to_account = new_to;
        self.committed.fetch_add(1, Ordering::Relaxed);
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
                    let from = rng.random_range(0..accounts);
                    let to = (from + rng.random_range(1..accounts)) % accounts;
                    let amount = rng.random_range(1..=100);
                    // Not raced against `cancel`: dropping a transfer halfway
                    // would leave it torn on the volume. It gives up by
                    // itself only between retries of a failing write.
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
