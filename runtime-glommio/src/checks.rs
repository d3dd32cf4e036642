//! What glommio needs from the machine, checked before any executor starts, so a user
//! gets a sentence saying what to change instead of a panic from inside an executor.

/// Why glommio cannot run here, with what to do about it.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum Refused {
    /// `kernel.io_uring_disabled` forbids io_uring to this process.
    #[error(
        "io_uring is disabled on this machine (kernel.io_uring_disabled = {0}): \
         run `sysctl kernel.io_uring_disabled=0` as root, or use --runtime tokio"
    )]
    IoUringDisabled(u8),
    /// The kernel predates the io_uring operations glommio uses.
    #[error(
        "the kernel is {0}, older than 5.8, the first with the io_uring operations glommio \
         uses: use --runtime tokio"
    )]
    KernelTooOld(String),
    /// RLIMIT_MEMLOCK is below what the executors' rings need.
    #[error(
        "the locked-memory limit (RLIMIT_MEMLOCK) is {have_kib} KiB, and {shards} glommio \
         executors need {need_kib} KiB (512 KiB each): run `ulimit -l {need_kib}` before \
         starting, or set LimitMEMLOCK={need_kib}K in a systemd unit, or use fewer --shards"
    )]
    MemlockTooLow {
        /// The soft limit, in KiB.
        have_kib: u64,
        /// What the executors need, in KiB.
        need_kib: u64,
        /// Executors asked for.
        shards: usize,
    },
    /// One executor is pinned per core; there are not enough.
    #[error(
        "{shards} shards asked for, but this process may run on {cores} cores and glommio \
         pins one shard to each: use --shards {cores} or fewer"
    )]
    TooManyShards {
        /// Shards asked for.
        shards: usize,
        /// Cores this process may run on.
        cores: usize,
    },
    /// The machine's facts could not be read.
    #[error("reading {what}: {error}")]
    Unreadable {
        /// What was being read.
        what: &'static str,
        /// Why it failed.
        error: String,
    },
}

/// What glommio checks an executor against: the RLIMIT_MEMLOCK each one needs.
const MEMLOCK_PER_EXECUTOR: u64 = 512 * 1024;

/// The facts of a machine that decide whether glommio can run `shards` executors on it.
#[derive(Clone, Debug)]
pub struct Machine {
    /// The kernel release, as `uname -r` gives it.
    pub release: String,
    /// `/proc/sys/kernel/io_uring_disabled`, where the kernel has it (6.6 and later).
    pub io_uring_disabled: Option<u8>,
    /// Whether the process runs as root, whom `io_uring_disabled = 1` still allows.
    pub root: bool,
    /// The soft RLIMIT_MEMLOCK, in bytes.
    pub memlock: u64,
    /// The cores this process may run on.
    pub cores: usize,
}

impl Machine {
    /// This machine, as this process sees it.
    pub fn this() -> Result<Machine, Refused> {
        let unreadable = |what: &'static str| {
            move |error: std::io::Error| Refused::Unreadable {
                what,
                error: error.to_string(),
            }
        };
        let release = std::fs::read_to_string("/proc/sys/kernel/osrelease")
            .map_err(unreadable("/proc/sys/kernel/osrelease"))?
            .trim()
            .to_owned();
        let io_uring_disabled = std::fs::read_to_string("/proc/sys/kernel/io_uring_disabled")
            .ok()
            .and_then(|value| value.trim().parse().ok());
        let status = std::fs::read_to_string("/proc/self/status")
            .map_err(unreadable("/proc/self/status"))?;
        // "Uid: real effective saved fs": the effective one decides.
        let root = status
            .lines()
            .find_map(|line| line.strip_prefix("Uid:"))
            .and_then(|ids| ids.split_whitespace().nth(1))
            == Some("0");
        let (memlock, _) = rlimit::Resource::MEMLOCK
            .get()
            .map_err(unreadable("RLIMIT_MEMLOCK"))?;
        let cores = std::thread::available_parallelism()
            .map_err(unreadable("the cores this process may use"))?
            .get();
        Ok(Machine {
            release,
            io_uring_disabled,
            root,
            memlock,
            cores,
        })
    }

    /// Whether glommio can run `shards` executors here; the first reason it cannot.
    pub fn check(&self, shards: usize) -> Result<(), Refused> {
        match self.io_uring_disabled {
            Some(2) => return Err(Refused::IoUringDisabled(2)),
            Some(1) if !self.root => return Err(Refused::IoUringDisabled(1)),
            _ => {}
        }
        if kernel_version(&self.release).is_some_and(|version| version < (5, 8)) {
            return Err(Refused::KernelTooOld(self.release.clone()));
        }
        let need = MEMLOCK_PER_EXECUTOR * shards as u64;
        if self.memlock < need {
            return Err(Refused::MemlockTooLow {
                have_kib: self.memlock / 1024,
                need_kib: need / 1024,
                shards,
            });
        }
        if shards > self.cores {
            return Err(Refused::TooManyShards {
                shards,
                cores: self.cores,
            });
        }
        Ok(())
    }
}

/// Checks this machine for `shards` glommio executors.
pub fn check(shards: usize) -> Result<(), Refused> {
    Machine::this()?.check(shards)
}

/// The major and minor version of a kernel release such as `6.1.0-18-amd64`.
fn kernel_version(release: &str) -> Option<(u32, u32)> {
    let mut parts = release.split(|c: char| !c.is_ascii_digit());
    let major = parts.next()?.parse().ok()?;
    let minor = parts.next()?.parse().ok()?;
    Some((major, minor))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fine() -> Machine {
        Machine {
            release: "6.1.0-18-amd64".into(),
            io_uring_disabled: Some(0),
            root: false,
            memlock: 8 << 20,
            cores: 2,
        }
    }

    #[test]
    fn a_machine_that_has_what_glommio_needs_passes() {
        assert_eq!(fine().check(2), Ok(()));
        let older = Machine {
            release: "5.8.0".into(),
            io_uring_disabled: None,
            ..fine()
        };
        assert_eq!(older.check(1), Ok(()));
        let unlimited = Machine {
            memlock: u64::MAX,
            ..fine()
        };
        assert_eq!(unlimited.check(2), Ok(()));
    }

    #[test]
    fn disabled_io_uring_is_refused_unless_root_may_still_use_it() {
        let disabled = Machine {
            io_uring_disabled: Some(2),
            root: true,
            ..fine()
        };
        assert_eq!(disabled.check(1), Err(Refused::IoUringDisabled(2)));
        let unprivileged = Machine {
            io_uring_disabled: Some(1),
            ..fine()
        };
        assert_eq!(unprivileged.check(1), Err(Refused::IoUringDisabled(1)));
        let root = Machine {
            root: true,
            ..unprivileged
        };
        assert_eq!(root.check(1), Ok(()));
        let message = disabled.check(1).unwrap_err().to_string();
        assert!(
            message.contains("sysctl kernel.io_uring_disabled=0"),
            "{message}"
        );
    }

    #[test]
    fn kernels_before_5_8_are_refused() {
        let old = Machine {
            release: "5.4.0-150-generic".into(),
            io_uring_disabled: None,
            ..fine()
        };
        assert_eq!(
            old.check(1),
            Err(Refused::KernelTooOld("5.4.0-150-generic".into()))
        );
        assert_eq!(kernel_version("6.12.9+rpt-rpi-v8"), Some((6, 12)));
        assert_eq!(kernel_version("4.19.0"), Some((4, 19)));
        assert_eq!(kernel_version("weird"), None);
    }

    #[test]
    fn too_little_locked_memory_names_the_ulimit_to_set() {
        let low = Machine {
            memlock: 512 * 1024,
            ..fine()
        };
        assert_eq!(low.check(1), Ok(()));
        let refused = low.check(2).unwrap_err();
        assert_eq!(
            refused,
            Refused::MemlockTooLow {
                have_kib: 512,
                need_kib: 1024,
                shards: 2
            }
        );
        assert!(refused.to_string().contains("ulimit -l 1024"), "{refused}");
    }

    #[test]
    fn more_shards_than_cores_are_refused() {
        assert_eq!(
            fine().check(3),
            Err(Refused::TooManyShards {
                shards: 3,
                cores: 2
            })
        );
    }
}
