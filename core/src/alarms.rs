//! Resource alarms: the node's memory use (resident set) against a high watermark and the free
//! space of the data directory's file system against a minimum, checked periodically. Front-ends
//! watch [`Alarms`] and hold back publishers while one is raised (AMQP `connection.blocked`), as
//! RabbitMQ does. Reads `/proc` and `statvfs`; touches nothing else.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::sync::watch;

/// Share of physical memory the memory alarm defaults to (RabbitMQ's
/// `vm_memory_high_watermark.relative`).
pub const MEMORY_HIGH_WATERMARK_SHARE_DEFAULT: f64 = 0.4;

/// When an alarm is raised. Each threshold has its unit in its name.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AlarmConfig {
    /// Resident memory of the process at or above which the memory alarm is raised, bytes. 0: 40%
    /// of the machine's physical memory (RabbitMQ's default); `u64::MAX`: never.
    pub memory_high_watermark_bytes: u64,
    /// Free bytes of the data directory's file system below which the disk alarm is raised
    /// (RabbitMQ's `disk_free_limit`, 50 MB by default). 0: never.
    pub disk_free_min_bytes: u64,
    /// How often both are measured, milliseconds.
    pub check_interval_ms: u64,
}

impl Default for AlarmConfig {
    fn default() -> Self {
        Self { memory_high_watermark_bytes: 0, disk_free_min_bytes: 50_000_000, check_interval_ms: 1_000 }
    }
}

/// The alarms in force.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Alarms {
    /// Memory use is at or above the high watermark.
    pub memory: bool,
    /// Free disk space is below the minimum.
    pub disk: bool,
}

impl Alarms {
    /// Whether any alarm is raised.
    pub fn any(self) -> bool {
        self.memory || self.disk
    }

    /// The reason RabbitMQ gives in `connection.blocked` ("low on memory", "low on disk").
    pub fn reason(self) -> &'static str {
        match (self.memory, self.disk) {
            (true, true) => "low on memory and disk",
            (true, false) => "low on memory",
            (false, true) => "low on disk",
            (false, false) => "",
        }
    }
}

/// The node's alarm state: the thresholds (changeable while running, like `rabbitmqctl
/// set_disk_free_limit`) and the current alarms.
#[derive(Debug)]
pub struct AlarmMonitor {
    thresholds: watch::Sender<AlarmConfig>,
    alarms: watch::Sender<Alarms>,
    /// Directory whose file system is measured (`None`: in-memory storage, no disk alarm).
    data_dir: Option<PathBuf>,
}

impl AlarmMonitor {
    /// A monitor with these thresholds; nothing is raised until the first check.
    pub fn new(config: AlarmConfig, data_dir: Option<PathBuf>) -> Self {
        Self { thresholds: watch::channel(config).0, alarms: watch::channel(Alarms::default()).0, data_dir }
    }

    /// The current alarms, to watch for changes.
    pub fn subscribe(&self) -> watch::Receiver<Alarms> {
        self.alarms.subscribe()
    }

    /// The alarms now.
    pub fn current(&self) -> Alarms {
        *self.alarms.borrow()
    }

    /// The thresholds in force.
    pub fn thresholds(&self) -> AlarmConfig {
        self.thresholds.borrow().clone()
    }

    /// Change the thresholds; the next check (at once) applies them.
    pub fn set_thresholds(&self, config: AlarmConfig) {
        self.thresholds.send_replace(config);
    }

    /// Measure once and raise or clear the alarms.
    pub fn check(&self) {
        let config = self.thresholds();
        let memory = match memory_watermark_bytes(&config) {
            Some(watermark) => resident_memory_bytes().is_some_and(|used| used >= watermark),
            None => false,
        };
        let disk = config.disk_free_min_bytes > 0
            && self.data_dir.as_deref().and_then(free_disk_bytes).is_some_and(|free| free < config.disk_free_min_bytes);
        let alarms = Alarms { memory, disk };
        self.alarms.send_if_modified(|current| {
            if *current == alarms {
                return false;
            }
            tracing::warn!(memory, disk, "resource alarms changed");
            *current = alarms;
            true
        });
    }

    /// Check every `check_interval_ms`, and at once when the thresholds change, until `stop`.
    pub async fn run(&self, mut stop: watch::Receiver<bool>) {
        let mut thresholds = self.thresholds.subscribe();
        loop {
            self.check();
            let interval = Duration::from_millis(self.thresholds().check_interval_ms.max(1));
            tokio::select! {
                _ = tokio::time::sleep(interval) => {}
                changed = thresholds.changed() => if changed.is_err() { return },
                _ = stop.changed() => return,
            }
            if *stop.borrow() {
                return;
            }
        }
    }
}

/// The memory watermark in bytes, `None` when the memory alarm is off or cannot be measured.
fn memory_watermark_bytes(config: &AlarmConfig) -> Option<u64> {
    match config.memory_high_watermark_bytes {
        u64::MAX => None,
        0 => physical_memory_bytes().map(|total| (total as f64 * MEMORY_HIGH_WATERMARK_SHARE_DEFAULT) as u64),
        bytes => Some(bytes),
    }
}

/// Resident set size of this process (Linux `/proc/self/statm`); `None` elsewhere.
pub fn resident_memory_bytes() -> Option<u64> {
    let statm = std::fs::read_to_string("/proc/self/statm").ok()?;
    let pages: u64 = statm.split_whitespace().nth(1)?.parse().ok()?;
    Some(pages * page_size_bytes())
}

/// Physical memory of the machine (Linux `/proc/meminfo`); `None` elsewhere.
pub fn physical_memory_bytes() -> Option<u64> {
    let meminfo = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = meminfo.lines().find(|line| line.starts_with("MemTotal:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// Bytes available to unprivileged writers on the file system holding `path`.
pub fn free_disk_bytes(path: &Path) -> Option<u64> {
    let stat = rustix::fs::statvfs(path).ok()?;
    Some(stat.f_bavail.saturating_mul(stat.f_frsize))
}

fn page_size_bytes() -> u64 {
    rustix::param::page_size() as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn measurements_are_plausible_on_linux() {
        if cfg!(target_os = "linux") {
            let rss = resident_memory_bytes().expect("statm");
            let total = physical_memory_bytes().expect("meminfo");
            assert!(rss > 0 && rss < total, "rss {rss}, total {total}");
            assert!(free_disk_bytes(Path::new("/")).is_some());
        }
    }

    #[test]
    fn thresholds_raise_and_clear_alarms() {
        let dir = std::env::temp_dir();
        let never =
            AlarmConfig { memory_high_watermark_bytes: u64::MAX, disk_free_min_bytes: 0, check_interval_ms: 10 };
        let monitor = AlarmMonitor::new(never.clone(), Some(dir));
        let mut alarms = monitor.subscribe();
        monitor.check();
        assert_eq!(monitor.current(), Alarms::default());
        if cfg!(target_os = "linux") {
            // A 1-byte watermark is always exceeded; more free space than any disk has is never there.
            monitor.set_thresholds(AlarmConfig {
                memory_high_watermark_bytes: 1,
                disk_free_min_bytes: u64::MAX,
                ..never.clone()
            });
            monitor.check();
            assert_eq!(monitor.current(), Alarms { memory: true, disk: true });
            assert!(alarms.has_changed().expect("open"));
            assert_eq!(alarms.borrow_and_update().reason(), "low on memory and disk");
            monitor.set_thresholds(never);
            monitor.check();
            assert!(!monitor.current().any());
        }
    }
}
