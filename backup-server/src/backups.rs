//! The backup program (1526): starts jobs, answers their progress, lists
//! and verifies what the store holds.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::job::{self, JobError, JobSpec, Progress};
use crate::manifest::Manifest;
use crate::source::{LuSource, SourceErrorKind};
use crate::store::{BackupStore, StoreError, VerifyOutcome};

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum JobState {
    Running,
    Complete,
    Failed(String),
    Cancelled,
}

impl JobState {
    pub fn is_finished(&self) -> bool {
        *self != JobState::Running
    }
}

/// What `GetBackup` and `ListBackups` report.
#[derive(Debug, Clone)]
pub struct BackupInfo {
    pub backup_id: String,
    pub run_id: String,
    pub label: String,
    pub lu: u32,
    pub state: JobState,
    pub bytes_done: u64,
    pub bytes_total: u64,
    pub throughput_bytes_per_s: u64,
    pub manifest: Option<Manifest>,
}

#[derive(Debug, thiserror::Error)]
pub enum BackupError {
    #[error("backup {0} does not exist")]
    NotFound(String),
    #[error("LU {0} does not exist on the array")]
    UnknownLu(u32),
    #[error("{0}")]
    InvalidArgument(String),
    #[error("the array is unavailable: {0}")]
    Unavailable(String),
    #[error("{0}")]
    Store(String),
}

impl From<StoreError> for BackupError {
    fn from(error: StoreError) -> Self {
        match error {
            StoreError::NotFound(id) => BackupError::NotFound(id),
            StoreError::BadId(id) => {
                BackupError::InvalidArgument(format!("{id:?} is not a backup id"))
            }
            other => BackupError::Store(other.to_string()),
        }
    }
}

struct Job {
    spec: JobSpec,
    progress: Progress,
    cancel: CancellationToken,
    state: watch::Sender<JobState>,
    manifest: Mutex<Option<Manifest>>,
}

pub struct Backups {
    store: BackupStore,
    source: Arc<dyn LuSource>,
    jobs: Mutex<HashMap<String, Arc<Job>>>,
    /// run id → backup id, so that a retried start answers the first job.
    by_run: Mutex<HashMap<String, String>>,
    tasks: TaskTracker,
    cancel: CancellationToken,
    /// The rate cap of jobs that do not ask for one.
    default_max_bytes_per_s: Option<u64>,
}

impl Backups {
    pub fn new(
        store: BackupStore,
        source: Arc<dyn LuSource>,
        tasks: TaskTracker,
        cancel: CancellationToken,
        default_max_bytes_per_s: Option<u64>,
    ) -> Self {
        Self {
            store,
            source,
            jobs: Mutex::new(HashMap::new()),
            by_run: Mutex::new(HashMap::new()),
            tasks,
            cancel,
            default_max_bytes_per_s,
        }
    }

    /// Starts a job and answers its backup id at once (and whether the run
    /// id had started one already, in this process or in the store).
    pub async fn start(
        self: &Arc<Self>,
        run_id: &str,
        lu: u32,
        expected_block_count: Option<u64>,
        label: &str,
        ledger_sequence: Option<u64>,
        max_bytes_per_s: Option<u64>,
    ) -> Result<(String, bool), BackupError> {
        if run_id.is_empty() {
            return Err(BackupError::InvalidArgument(
                "run_id must not be empty".into(),
            ));
        }
        if let Some(id) = self.by_run.lock().expect("by_run").get(run_id) {
            return Ok((id.clone(), true));
        }
        if let Some(done) = self.store.list()?.into_iter().find(|m| m.run_id == run_id) {
            return Ok((done.backup_id, true));
        }
        // Unknown LUs and an unreachable array are answered now, not as a
        // job that fails later.
        self.source.geometry(lu).await.map_err(|e| match e.kind {
            SourceErrorKind::NotFound => BackupError::UnknownLu(lu),
            SourceErrorKind::Unavailable => BackupError::Unavailable(e.message),
            SourceErrorKind::Other => BackupError::InvalidArgument(e.message),
        })?;
        let backup_id = uuid::Uuid::now_v7().to_string();
        let job = Arc::new(Job {
            spec: JobSpec {
                backup_id: backup_id.clone(),
                run_id: run_id.to_string(),
                lu,
                expected_block_count,
                label: label.to_string(),
                ledger_sequence,
                max_bytes_per_s: max_bytes_per_s.or(self.default_max_bytes_per_s),
            },
            progress: Progress::new(),
            cancel: self.cancel.child_token(),
            state: watch::Sender::new(JobState::Running),
            manifest: Mutex::new(None),
        });
        {
            let mut by_run = self.by_run.lock().expect("by_run");
            if let Some(id) = by_run.get(run_id) {
                // A concurrent start with the same run id won the race.
                return Ok((id.clone(), true));
            }
            by_run.insert(run_id.to_string(), backup_id.clone());
            self.jobs
                .lock()
                .expect("jobs")
                .insert(backup_id.clone(), job.clone());
        }
        let backups = self.clone();
        self.tasks.spawn(async move {
            backups.run(job).await;
        });
        tracing::info!(%backup_id, run_id, lu, "backup started");
        Ok((backup_id, false))
    }

    async fn run(&self, job: Arc<Job>) {
        let result = job::run(
            &self.store,
            self.source.as_ref(),
            &job.spec,
            &job.progress,
            &job.cancel,
        )
        .await;
        let id = &job.spec.backup_id;
        let state = match result {
            Ok(manifest) => {
                tracing::info!(backup_id = %id, bytes = manifest.size_bytes, image_digest = %manifest.image_digest, "backup complete");
                *job.manifest.lock().expect("manifest") = Some(manifest);
                JobState::Complete
            }
            Err(JobError::Cancelled) => {
                tracing::info!(backup_id = %id, "backup cancelled");
                JobState::Cancelled
            }
            Err(error) => {
                let reason = if error.is_unavailable() {
                    format!("UNAVAILABLE: {error}")
                } else {
                    error.to_string()
                };
                tracing::warn!(backup_id = %id, "backup failed: {reason}");
                JobState::Failed(reason)
            }
        };
        job.state.send_replace(state);
    }

    fn job(&self, id: &str) -> Option<Arc<Job>> {
        self.jobs.lock().expect("jobs").get(id).cloned()
    }

    fn job_info(job: &Job) -> BackupInfo {
        BackupInfo {
            backup_id: job.spec.backup_id.clone(),
            run_id: job.spec.run_id.clone(),
            label: job.spec.label.clone(),
            lu: job.spec.lu,
            state: job.state.borrow().clone(),
            bytes_done: job
                .progress
                .bytes_done
                .load(std::sync::atomic::Ordering::Relaxed),
            bytes_total: job
                .progress
                .bytes_total
                .load(std::sync::atomic::Ordering::Relaxed),
            throughput_bytes_per_s: job.progress.throughput_bytes_per_s(),
            manifest: job.manifest.lock().expect("manifest").clone(),
        }
    }

    fn manifest_info(manifest: Manifest) -> BackupInfo {
        BackupInfo {
            backup_id: manifest.backup_id.clone(),
            run_id: manifest.run_id.clone(),
            label: manifest.label.clone(),
            lu: manifest.source_lu,
            state: JobState::Complete,
            bytes_done: manifest.size_bytes,
            bytes_total: manifest.size_bytes,
            throughput_bytes_per_s: 0,
            manifest: Some(manifest),
        }
    }

    pub fn get(&self, id: &str) -> Result<BackupInfo, BackupError> {
        if let Some(job) = self.job(id) {
            return Ok(Self::job_info(&job));
        }
        Ok(Self::manifest_info(self.store.manifest(id)?))
    }

    /// Jobs of this process (running, failed, cancelled) and every complete
    /// backup in the store.
    pub fn list(&self) -> Result<Vec<BackupInfo>, BackupError> {
        let mut infos: Vec<BackupInfo> = self
            .jobs
            .lock()
            .expect("jobs")
            .values()
            .map(|job| Self::job_info(job))
            .collect();
        for manifest in self.store.list()? {
            if !infos.iter().any(|i| i.backup_id == manifest.backup_id) {
                infos.push(Self::manifest_info(manifest));
            }
        }
        // uuid v7 ids sort by creation time.
        infos.sort_by(|a, b| a.backup_id.cmp(&b.backup_id));
        Ok(infos)
    }

    pub fn cancel(&self, id: &str) -> Result<BackupInfo, BackupError> {
        match self.job(id) {
            Some(job) => {
                job.cancel.cancel();
                Ok(Self::job_info(&job))
            }
            None => self.get(id),
        }
    }

    /// A receiver that changes when the job's state does.
    pub fn subscribe(&self, id: &str) -> Result<Option<watch::Receiver<JobState>>, BackupError> {
        match self.job(id) {
            Some(job) => Ok(Some(job.state.subscribe())),
            None => self.store.manifest(id).map(|_| None).map_err(Into::into),
        }
    }

    pub async fn verify(&self, id: &str) -> Result<VerifyOutcome, BackupError> {
        let store = self.store.clone();
        let id = id.to_string();
        tokio::task::spawn_blocking(move || store.verify(&id))
            .await
            .map_err(|e| BackupError::Store(e.to_string()))?
            .map_err(Into::into)
    }
}
