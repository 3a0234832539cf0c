//! Test cgroups for the local-origin tests: a uniquely named cgroup v2 under the hierarchy's
//! root (found in /proc/mounts), processes started inside it, and what is attached to it.

use std::{
    os::fd::AsRawFd,
    path::PathBuf,
    process::{Child, Command, Output, Stdio},
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

    /// Starts `program ARGS…` inside this cgroup and in `netns` (keeping the host's mounts),
    /// its output piped; the caller waits for it (before the cgroup is dropped).
    pub fn spawn(&self, netns: &Netns, program: &str, args: &[&str]) -> Result<Child> {
        Command::new("nsenter")
            .arg(format!("--net=/run/netns/{}", netns.name))
            .args(["sh", "-c", &self.join_then_exec(), "sh"])
            .arg(program)
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("starting {program}"))
    }

    /// A shell script that joins this cgroup, then becomes the program: nothing else runs
    /// in it.
    fn join_then_exec(&self) -> String {
        format!(
            "echo $$ > '{}/cgroup.procs' && exec \"$@\"",
            self.dir.display()
        )
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
        let script = self.join_then_exec();
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

/// A cgroup v1 net_cls class for the tests of `classid` selections: a class directory with
/// its `net_cls.classid`, in a net_cls hierarchy mounted under a temporary directory of its
/// own (or, when the kernel's net_cls hierarchy is already mounted together with other
/// controllers, which a second mount of net_cls alone cannot join, in that one). The class,
/// the mount and the directory go on drop.
pub struct NetClsClass {
    dir: PathBuf,
    /// The mount point this class made (unmounted and removed on drop), if it made one.
    mounted: Option<PathBuf>,
}

impl NetClsClass {
    /// A new class with id `classid`.
    pub fn new(classid: u32) -> Result<Self> {
        let point = std::env::temp_dir().join(crate::unique_name("netcls"));
        std::fs::create_dir(&point)
            .with_context(|| format!("creating mount point {}", point.display()))?;
        let (root, mounted) = match mount_net_cls(&point) {
            Ok(()) => (point.clone(), Some(point)),
            Err(error) => {
                let _ = std::fs::remove_dir(&point);
                let root = mounted_net_cls().with_context(|| {
                    format!("mounting net_cls ({error}) and finding it mounted")
                })?;
                (root, None)
            }
        };
        let class = NetClsClass {
            dir: root.join(crate::unique_name("class")),
            mounted,
        };
        std::fs::create_dir(&class.dir)
            .with_context(|| format!("creating net_cls class {}", class.dir.display()))?;
        std::fs::write(class.dir.join("net_cls.classid"), classid.to_string())
            .with_context(|| format!("writing {}/net_cls.classid", class.dir.display()))?;
        Ok(class)
    }

    /// The wrapper (for [`TestCgroup::run`] and [`run_outside_cgroup`]) that joins the
    /// class, then runs what follows it.
    pub fn wrapper(&self) -> [String; 4] {
        [
            "sh".into(),
            "-c".into(),
            format!(
                "echo $$ > '{}/cgroup.procs' && exec \"$@\"",
                self.dir.display()
            ),
            "sh".into(),
        ]
    }
}

fn mount_net_cls(point: &std::path::Path) -> Result<()> {
    use std::{ffi::CString, os::unix::ffi::OsStrExt};
    let target = CString::new(point.as_os_str().as_bytes())?;
    let (source, kind, options) = (c"none", c"cgroup", c"net_cls");
    // SAFETY: NUL-terminated strings that outlive the call.
    let done = unsafe {
        libc::mount(
            source.as_ptr(),
            target.as_ptr(),
            kind.as_ptr(),
            0,
            options.as_ptr().cast(),
        )
    };
    if done != 0 {
        return Err(std::io::Error::last_os_error()).context("mount -t cgroup -o net_cls");
    }
    Ok(())
}

/// Where a cgroup v1 hierarchy with net_cls is mounted, from /proc/mounts.
fn mounted_net_cls() -> Result<PathBuf> {
    let mounts = std::fs::read_to_string("/proc/mounts")?;
    mounts
        .lines()
        .map(|line| line.split_whitespace().collect::<Vec<_>>())
        .find(|fields| {
            fields.len() > 3
                && fields[2] == "cgroup"
                && fields[3].split(',').any(|option| option == "net_cls")
        })
        .map(|fields| PathBuf::from(fields[1]))
        .ok_or_else(|| anyhow!("no cgroup v1 hierarchy with net_cls in /proc/mounts"))
}

impl Drop for NetClsClass {
    fn drop(&mut self) {
        if let Err(error) = remove_when_empty(&self.dir) {
            eprintln!("warning: {error:#}");
        }
        if let Some(point) = &self.mounted {
            let target = std::ffi::CString::new(point.to_string_lossy().as_bytes()).unwrap();
            // SAFETY: a NUL-terminated string that outlives the call.
            if unsafe { libc::umount2(target.as_ptr(), 0) } != 0 {
                eprintln!(
                    "warning: unmounting {}: {}",
                    point.display(),
                    std::io::Error::last_os_error()
                );
            }
            if let Err(error) = std::fs::remove_dir(point) {
                eprintln!("warning: removing {}: {error}", point.display());
            }
        }
    }
}
