//! Test cgroups for the local-origin tests: a uniquely named cgroup v2 under the hierarchy's
//! root (found in /proc/mounts), processes started inside it, and what is attached to it.

use std::{
    os::fd::AsRawFd,
    path::PathBuf,
    process::{Command, Output},
};

use anyhow::{anyhow, bail, Context, Result};

use crate::Netns;

/// Where the cgroup v2 hierarchy is mounted.
pub fn cgroup2_root() -> Result<PathBuf> {
    let mounts = std::fs::read_to_string("/proc/mounts")?;
    mounts
        .lines()
        .find_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            (fields.get(2) == Some(&"cgroup2")).then(|| PathBuf::from(fields[1]))
        })
        .ok_or_else(|| anyhow!("no cgroup2 file system in /proc/mounts"))
}

/// A cgroup v2 made for one test, removed on drop (once the processes started in it ended).
pub struct TestCgroup {
    /// Its path from the hierarchy's root, as `--cgroup` takes it (`/tpx…`).
    pub path: String,
    dir: PathBuf,
}

impl TestCgroup {
    pub fn new(role: &str) -> Result<Self> {
        let name = crate::unique_name(role);
        let dir = cgroup2_root()?.join(&name);
        std::fs::create_dir(&dir).with_context(|| format!("creating cgroup {}", dir.display()))?;
        Ok(TestCgroup {
            path: format!("/{name}"),
            dir,
        })
    }

    /// A cgroup inside this one (removed on drop; drop it before its parent).
    pub fn child(&self, role: &str) -> Result<Self> {
        let name = crate::unique_name(role);
        let dir = self.dir.join(&name);
        std::fs::create_dir(&dir).with_context(|| format!("creating cgroup {}", dir.display()))?;
        Ok(TestCgroup {
            path: format!("{}/{name}", self.path),
            dir,
        })
    }

    /// Runs `program ARGS…` to its end inside this cgroup and in `netns` (keeping the host's
    /// mounts), with `wrapper` (e.g. `setpriv --reuid=…`) in front.
    pub fn run(
        &self,
        netns: &Netns,
        wrapper: &[&str],
        program: &str,
        args: &[&str],
    ) -> Result<Output> {
        // The shell joins the cgroup, then becomes the program: nothing else runs in it.
        let script = format!(
            "echo $$ > '{}/cgroup.procs' && exec \"$@\"",
            self.dir.display()
        );
        run_in(netns, &["sh", "-c", &script, "sh"], wrapper, program, args)
    }

    /// How many programs are attached to this cgroup at `attach_type` (the kernel's
    /// `BPF_CGROUP_*` numbers: 10 is inet4 connect, 11 inet6 connect).
    pub fn attached(&self, attach_type: u32) -> Result<u32> {
        let dir = std::fs::File::open(&self.dir)?;
        // `bpf_attr` for BPF_PROG_QUERY: target_fd, attach_type, query_flags, attach_flags,
        // prog_ids (pointer), prog_cnt; no ids wanted, only the count.
        #[repr(C)]
        #[derive(Default)]
        struct Query {
            target_fd: u32,
            attach_type: u32,
            query_flags: u32,
            attach_flags: u32,
            prog_ids: u64,
            prog_cnt: u32,
            _pad: [u32; 9],
        }
        const BPF_PROG_QUERY: libc::c_long = 16;
        let mut query = Query {
            target_fd: dir.as_raw_fd() as u32,
            attach_type,
            ..Query::default()
        };
        // SAFETY: a bpf(2) call with a zeroed attribute of the size given, outliving the call.
        let ret = unsafe {
            libc::syscall(
                libc::SYS_bpf,
                BPF_PROG_QUERY,
                &mut query as *mut Query,
                std::mem::size_of::<Query>(),
            )
        };
        if ret != 0 {
            bail!(
                "BPF_PROG_QUERY on {}: {}",
                self.dir.display(),
                std::io::Error::last_os_error()
            );
        }
        Ok(query.prog_cnt)
    }

    /// Removes this cgroup and creates it again, as systemd does when it restarts a unit: the
    /// same path, a new directory (with a new id and nothing attached).
    pub fn recreate(&self) -> Result<()> {
        remove_when_empty(&self.dir)?;
        create(&self.dir)
    }

    /// As [`TestCgroup::recreate`], with its `parent` (which it is directly below) removed
    /// and created again too.
    pub fn recreate_with_parent(&self, parent: &TestCgroup) -> Result<()> {
        remove_when_empty(&self.dir)?;
        remove_when_empty(&parent.dir)?;
        create(&parent.dir)?;
        create(&self.dir)
    }
}

/// Removes cgroup directory `dir`. The kernel may take a moment to see the last process of
/// a run gone, and refuses to remove it until then.
fn remove_when_empty(dir: &std::path::Path) -> Result<()> {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        match std::fs::remove_dir(dir) {
            Ok(()) => return Ok(()),
            Err(error)
                if error.raw_os_error() == Some(libc::EBUSY)
                    && std::time::Instant::now() < deadline =>
            {
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
            Err(error) => return Err(error).with_context(|| format!("removing {}", dir.display())),
        }
    }
}

fn create(dir: &std::path::Path) -> Result<()> {
    std::fs::create_dir(dir).with_context(|| format!("creating {} again", dir.display()))
}

impl Drop for TestCgroup {
    fn drop(&mut self) {
        if let Err(error) = std::fs::remove_dir(&self.dir) {
            eprintln!("warning: removing cgroup {}: {error}", self.dir.display());
        }
    }
}

/// Runs `program ARGS…` to its end in `netns` with the host's mounts (and cgroup), with
/// `wrapper` in front.
pub fn run_outside_cgroup(
    netns: &Netns,
    wrapper: &[&str],
    program: &str,
    args: &[&str],
) -> Result<Output> {
    run_in(netns, &[], wrapper, program, args)
}

fn run_in(
    netns: &Netns,
    shell: &[&str],
    wrapper: &[&str],
    program: &str,
    args: &[&str],
) -> Result<Output> {
    Command::new("nsenter")
        .arg(format!("--net=/run/netns/{}", netns.name))
        .args(shell)
        .args(wrapper)
        .arg(program)
        .args(args)
        .output()
        .with_context(|| format!("running {program}"))
}

/// `dial PROTO ADDR MESSAGE` (the tests crate's client) through `run`; its line
/// `PEER REPLY`, or an error with its stderr.
pub fn dial_output(output: Output) -> Result<String> {
    if !output.status.success() {
        bail!(
            "dial failed: {}",
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&output.stdout).trim().to_string())
}
