//! A real container engine for the container tests, and the image `cargo xtask image` builds.
//!
//! [`Engine`] starts a `dockerd` of the test's own (data root, exec root, pidfile and socket
//! under test directories) inside a network namespace the test creates: Docker's bridges,
//! its iptables rules, its FORWARD policy DROP and the `ip_forward` it turns on all stay in
//! that namespace and go with it, and "host network" containers share that namespace, so
//! nothing of the machine's own network is touched. The daemon, its containers and its
//! directories are removed on drop.
//!
//! No registry is reachable from the test machines, so every image is built `FROM scratch`
//! from files on the machine: tproxy's from the release binary and the shared libraries
//! `ldd` lists for it, the client's from Debian's static busybox.

use std::{
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};

use crate::Netns;

/// The image `cargo xtask image` builds and the tests run.
pub const IMAGE: &str = "tproxy:latest";

/// `docker` pointed at one daemon.
#[derive(Clone, Debug)]
pub struct Docker {
    /// `DOCKER_HOST`; `None` for the client's default daemon.
    host: Option<String>,
}

impl Docker {
    /// The daemon the `docker` client talks to by default (what `cargo xtask image` uses).
    pub fn default_daemon() -> Self {
        Docker { host: None }
    }

    /// A `docker ARGS…` command for this daemon.
    pub fn command(&self, args: &[&str]) -> Command {
        let mut command = Command::new("docker");
        command.args(args).stdin(Stdio::null());
        if let Some(host) = &self.host {
            command.env("DOCKER_HOST", host);
        }
        command
    }

    /// Runs `docker ARGS…`; its stdout, trimmed, or an error with its stderr.
    pub fn run(&self, args: &[&str]) -> Result<String> {
        let output = self
            .command(args)
            .output()
            .context("running `docker` (cargo xtask setup installs docker.io)")?;
        if !output.status.success() {
            bail!(
                "`docker {}` failed: {}",
                args.join(" "),
                String::from_utf8_lossy(&output.stderr).trim()
            );
        }
        Ok(String::from_utf8_lossy(&output.stdout).trim().to_string())
    }

    /// Builds `tag` from `containerfile` with `context` as the build context.
    fn build(&self, containerfile: &Path, context: &Path, tag: &str) -> Result<()> {
        self.run(&[
            "build",
            "--quiet",
            "--file",
            path_str(containerfile)?,
            "--tag",
            tag,
            path_str(context)?,
        ])
        .map(drop)
    }
}

fn path_str(path: &Path) -> Result<&str> {
    path.to_str()
        .with_context(|| format!("{} is not UTF-8", path.display()))
}

/// The shared libraries the dynamic loader maps for `binary`, the loader itself included, as
/// `ldd` lists them (the vDSO, which has no file, left out).
pub fn shared_libraries(binary: &Path) -> Result<Vec<PathBuf>> {
    let output = Command::new("ldd")
        .arg(binary)
        .output()
        .context("running ldd")?;
    let text = String::from_utf8_lossy(&output.stdout);
    if !output.status.success() {
        // A static binary: "not a dynamic executable", and nothing to copy.
        if String::from_utf8_lossy(&output.stderr).contains("not a dynamic executable") {
            return Ok(Vec::new());
        }
        bail!(
            "ldd {} failed: {}",
            binary.display(),
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    let mut libraries = Vec::new();
    for line in text.lines() {
        // "libc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x…)" or "/lib64/ld-linux-x86-64.so.2 (0x…)".
        let path = match line.split_once("=>") {
            Some((_, resolved)) => resolved.trim(),
            None => line.trim(),
        };
        let path = path.split(" (").next().unwrap_or("").trim();
        if path == "not found" {
            bail!("ldd {}: {line}", binary.display());
        }
        if path.starts_with('/') {
            libraries.push(PathBuf::from(path));
        }
    }
    Ok(libraries)
}

/// Copies `source` (following symlinks) to the same absolute path under `root`.
fn copy_into(root: &Path, source: &Path, at: &Path) -> Result<()> {
    let target = root.join(at.strip_prefix("/").unwrap_or(at));
    std::fs::create_dir_all(target.parent().expect("an absolute path has a parent"))?;
    std::fs::copy(source, &target)
        .with_context(|| format!("copying {} to {}", source.display(), target.display()))?;
    Ok(())
}

/// Builds [`IMAGE`] with `docker`: deploy/Containerfile over a context holding `rootfs/`, which
/// is `binary` (without its debug info) at /usr/local/bin/tproxy and exactly the libraries `ldd` lists for it, at the
/// paths the loader looks for them. The context is assembled in `context` (emptied first).
pub fn build_tproxy_image(docker: &Docker, binary: &Path, context: &Path) -> Result<()> {
    let _ = std::fs::remove_dir_all(context);
    let rootfs = context.join("rootfs");
    let installed = Path::new("/usr/local/bin/tproxy");
    copy_into(&rootfs, binary, installed)?;
    // The release profile keeps debug info (for profiling); the image does not need the
    // 50 MB of it.
    let status = Command::new("strip")
        .arg("--strip-debug")
        .arg(rootfs.join(installed.strip_prefix("/").expect("absolute")))
        .status()
        .context("running strip (binutils)")?;
    if !status.success() {
        bail!("strip --strip-debug of the image's tproxy failed: {status}");
    }
    for library in shared_libraries(binary)? {
        copy_into(&rootfs, &library, &library)?;
    }
    let containerfile = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/Containerfile");
    docker.build(&containerfile, context, IMAGE)
}

/// Builds `tag`, an image holding only Debian's static busybox at /bin/busybox with the
/// applets the tests use linked to it, and /www/cgi-bin/peer, which answers with the address
/// the request came from: `wget` as a client and `httpd -h /www` as a server.
pub fn build_busybox_image(docker: &Docker, tag: &str, context: &Path) -> Result<()> {
    let busybox = Path::new("/bin/busybox");
    let _ = std::fs::remove_dir_all(context);
    let rootfs = context.join("rootfs");
    copy_into(&rootfs, busybox, busybox)?;
    if !shared_libraries(busybox)?.is_empty() {
        bail!("/bin/busybox is not static: install busybox-static (cargo xtask setup does)");
    }
    for applet in ["sh", "wget", "httpd", "cat"] {
        std::os::unix::fs::symlink("busybox", rootfs.join("bin").join(applet))?;
    }
    let cgi = rootfs.join("www/cgi-bin");
    std::fs::create_dir_all(&cgi)?;
    std::fs::write(
        cgi.join("peer"),
        "#!/bin/sh\necho 'Content-Type: text/plain'\necho\necho \"$REMOTE_ADDR\"\n",
    )?;
    std::fs::set_permissions(
        cgi.join("peer"),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )?;
    let containerfile = context.join("Containerfile");
    std::fs::write(&containerfile, "FROM scratch\nCOPY rootfs/ /\n")?;
    docker.build(&containerfile, context, tag)
}

/// A `dockerd` of the test's own in a namespace of the test's own. Containers, the daemon and
/// its directories are removed on drop (the namespace goes with its [`Netns`]).
pub struct Engine {
    /// Where Docker's bridges live and where host-network containers run.
    pub netns: Netns,
    pub docker: Docker,
    daemon: Child,
    /// The daemon's own directories: data root, exec root, socket, pidfile.
    dir: PathBuf,
    data_root: PathBuf,
}

impl Engine {
    /// Starts the daemon and waits until it answers.
    pub fn start() -> Result<Self> {
        for (command, package) in [("dockerd", "docker.io"), ("docker", "docker.io")] {
            if Command::new(command).arg("--version").output().is_err() {
                bail!("`{command}` is missing: install {package} (cargo xtask setup does)");
            }
        }
        let netns = Netns::new("engine")?;
        let dir = PathBuf::from("/run/tproxy-tests").join(format!("docker-{}", netns.name));
        let data_root = PathBuf::from("/var/lib/tproxy-tests").join(&netns.name);
        std::fs::create_dir_all(&dir)?;
        std::fs::create_dir_all(&data_root)?;
        let socket = dir.join("docker.sock");
        let log = std::fs::File::create(dir.join("dockerd.log"))?;
        // nsenter joins only the network namespace: the daemon keeps the host's mounts, so
        // a bpf filesystem the test mounts later is there to bind into a container.
        let daemon = Command::new("nsenter")
            .arg(format!("--net=/run/netns/{}", netns.name))
            .arg("dockerd")
            .arg("--data-root")
            .arg(&data_root)
            .arg("--exec-root")
            .arg(dir.join("exec"))
            .arg("--pidfile")
            .arg(dir.join("dockerd.pid"))
            .arg("--host")
            .arg(format!("unix://{}", socket.display()))
            // No default docker0: the tests make their own networks.
            .arg("--bridge=none")
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("starting dockerd")?;
        let mut engine = Engine {
            netns,
            docker: Docker {
                host: Some(format!("unix://{}", socket.display())),
            },
            daemon,
            dir,
            data_root,
        };
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if engine.docker.run(&["version"]).is_ok() {
                return Ok(engine);
            }
            if let Some(status) = engine.daemon.try_wait()? {
                bail!("dockerd exited ({status}): {}", engine.daemon_log());
            }
            if Instant::now() > deadline {
                bail!(
                    "dockerd did not answer within 60 s: {}",
                    engine.daemon_log()
                );
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// What the daemon logged so far.
    pub fn daemon_log(&self) -> String {
        std::fs::read_to_string(self.dir.join("dockerd.log")).unwrap_or_default()
    }

    /// A directory of the test's own next to the daemon's (for build contexts, mounts).
    pub fn scratch_dir(&self, name: &str) -> Result<PathBuf> {
        let dir = self.dir.join(name);
        std::fs::create_dir_all(&dir)?;
        Ok(dir)
    }
}

impl Drop for Engine {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("--- dockerd log ---\n{}\n--- end ---", self.daemon_log());
        }
        if let Ok(ids) = self.docker.run(&["ps", "--all", "--quiet"]) {
            for id in ids.split_whitespace() {
                let _ = self.docker.run(&["rm", "--force", id]);
            }
        }
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.daemon.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        );
        let deadline = Instant::now() + Duration::from_secs(30);
        while matches!(self.daemon.try_wait(), Ok(None)) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = self.daemon.kill();
        let _ = self.daemon.wait();
        // The daemon leaves a bind mount of its namespace (exec-root/netns/default), which
        // would keep the namespace alive, and overlay mounts if it was killed.
        for root in [&self.dir, &self.data_root] {
            let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap_or_default();
            let prefix = root.display().to_string();
            let mut below: Vec<&str> = mounts
                .lines()
                .filter_map(|l| l.split_whitespace().nth(1))
                .filter(|m| m.starts_with(&prefix))
                .collect();
            below.sort_by_key(|m| std::cmp::Reverse(m.len()));
            for mount in below {
                let _ = Command::new("umount").args(["--lazy", mount]).status();
            }
            let _ = std::fs::remove_dir_all(root);
        }
    }
}
