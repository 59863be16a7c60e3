//! PID to pod attribution through `/proc/<pid>/cgroup`.
//!
//! NVML reports host PIDs. With the host's `/proc` mounted (or `hostPID`),
//! the cgroup path of a PID names the pod UID and the container id, for the
//! systemd and cgroupfs drivers and for containerd, CRI-O and Docker:
//!
//! ```text
//! 0::/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod<uid_with_underscores>.slice/cri-containerd-<id>.scope
//! 11:memory:/kubepods/besteffort/pod<uid>/<id>
//! ```

use std::path::PathBuf;

use crate::health::ErrorKind;

/// The pod and container a process runs in.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProcessOwner {
    pub pod_uid: String,
    /// Runtime container id (hex), when the path names one.
    pub container_id: Option<String>,
}

/// Looks up the pod of a host PID.
pub trait ProcessResolver {
    /// `Ok(None)`: the process is not in a pod (or exited). `Err`: the
    /// process table cannot be read at all.
    fn owner(&self, pid: u32) -> Result<Option<ProcessOwner>, ErrorKind>;
}

/// Reads `<proc_root>/<pid>/cgroup`.
#[derive(Clone, Debug)]
pub struct ProcCgroupResolver {
    proc_root: PathBuf,
}

impl ProcCgroupResolver {
    pub fn new(proc_root: impl Into<PathBuf>) -> Self {
        Self {
            proc_root: proc_root.into(),
        }
    }
}

impl ProcessResolver for ProcCgroupResolver {
    fn owner(&self, pid: u32) -> Result<Option<ProcessOwner>, ErrorKind> {
        let path = self.proc_root.join(pid.to_string()).join("cgroup");
        match std::fs::read_to_string(&path) {
            Ok(text) => Ok(parse_cgroup_file(&text)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                if self.proc_root.join("self").exists() || self.proc_root.join("1").exists() {
                    // The process table is visible; this PID just is not in it.
                    Ok(None)
                } else {
                    Err(ErrorKind::NotFound)
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => {
                Err(ErrorKind::NoPermission)
            }
            Err(_) => Err(ErrorKind::Io),
        }
    }
}

/// Pod UID in canonical form (8-4-4-4-12 lowercase hex), if `s` is one, with
/// dashes or with the underscores the systemd driver uses.
fn canonical_uid(s: &str) -> Option<String> {
    let uid = s.replace('_', "-").to_ascii_lowercase();
    let groups: Vec<&str> = uid.split('-').collect();
    let shape = [8, 4, 4, 4, 12];
    let ok = groups.len() == shape.len()
        && groups
            .iter()
            .zip(shape)
            .all(|(g, n)| g.len() == n && g.chars().all(|c| c.is_ascii_hexdigit()));
    ok.then_some(uid)
}

/// Pod UID from one path segment such as `pod<uid>` or
/// `kubepods-burstable-pod<uid>.slice`.
fn pod_uid_of_segment(segment: &str) -> Option<String> {
    let segment = segment.strip_suffix(".slice").unwrap_or(segment);
    let (_, candidate) = segment.rsplit_once("pod")?;
    canonical_uid(candidate)
}

/// Container id from the segment after the pod segment.
fn container_id_of_segment(segment: &str) -> Option<String> {
    let segment = segment.strip_suffix(".scope").unwrap_or(segment);
    let id = ["cri-containerd-", "crio-", "docker-", "containerd-"]
        .iter()
        .find_map(|prefix| segment.strip_prefix(prefix))
        .unwrap_or(segment);
    (id.len() >= 12 && id.len() <= 128 && id.chars().all(|c| c.is_ascii_hexdigit()))
        .then(|| id.to_ascii_lowercase())
}

/// Parses one cgroup path.
pub fn parse_cgroup_path(path: &str) -> Option<ProcessOwner> {
    let segments: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).collect();
    let (at, pod_uid) = segments
        .iter()
        .enumerate()
        .find_map(|(i, s)| pod_uid_of_segment(s).map(|uid| (i, uid)))?;
    let container_id = segments
        .get(at + 1)
        .and_then(|s| container_id_of_segment(s));
    Some(ProcessOwner {
        pod_uid,
        container_id,
    })
}

/// Parses a whole `/proc/<pid>/cgroup` file (v1 or v2); the first line that
/// names a pod wins, preferring one that also names a container.
pub fn parse_cgroup_file(text: &str) -> Option<ProcessOwner> {
    let mut best: Option<ProcessOwner> = None;
    for line in text.lines() {
        let Some(path) = line.splitn(3, ':').nth(2) else {
            continue;
        };
        if let Some(owner) = parse_cgroup_path(path) {
            if owner.container_id.is_some() {
                return Some(owner);
            }
            best.get_or_insert(owner);
        }
    }
    best
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const UID: &str = "0f3e7b8c-1a2b-4c5d-8e9f-001122334455";
    const CID: &str = "4f1d2a3b4c5d6e7f8091a2b3c4d5e6f708192a3b4c5d6e7f8091a2b3c4d5e6f7";

    #[test]
    fn systemd_v2_containerd() {
        let line = format!(
            "0::/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{}.slice/cri-containerd-{CID}.scope\n",
            UID.replace('-', "_")
        );
        assert_eq!(
            parse_cgroup_file(&line),
            Some(ProcessOwner {
                pod_uid: UID.into(),
                container_id: Some(CID.into())
            })
        );
    }

    #[test]
    fn cgroupfs_v1_and_guaranteed_qos() {
        let text = format!("12:pids:/\n11:memory:/kubepods/pod{UID}/{CID}\n0::/\n");
        let owner = parse_cgroup_file(&text).unwrap();
        assert_eq!(owner.pod_uid, UID);
        assert_eq!(owner.container_id.as_deref(), Some(CID));
        let crio = format!(
            "0::/kubepods.slice/kubepods-pod{}.slice/crio-{CID}.scope",
            UID.replace('-', "_")
        );
        assert_eq!(
            parse_cgroup_file(&crio).unwrap().container_id.as_deref(),
            Some(CID)
        );
    }

    #[test]
    fn not_a_pod() {
        assert_eq!(parse_cgroup_file("0::/system.slice/sshd.service\n"), None);
        assert_eq!(
            parse_cgroup_file("0::/kubepods.slice/kubepods-burstable.slice\n"),
            None
        );
        assert_eq!(parse_cgroup_file(""), None);
    }

    #[test]
    fn resolver_reads_a_proc_tree() {
        let dir = std::env::temp_dir().join(format!("tokentap-cgroup-{}", std::process::id()));
        std::fs::create_dir_all(dir.join("77")).unwrap();
        std::fs::create_dir_all(dir.join("self")).unwrap();
        std::fs::write(
            dir.join("77/cgroup"),
            format!("0::/kubepods/burstable/pod{UID}/{CID}\n"),
        )
        .unwrap();
        let resolver = ProcCgroupResolver::new(&dir);
        assert_eq!(resolver.owner(77).unwrap().unwrap().pod_uid, UID);
        assert_eq!(resolver.owner(78), Ok(None));
        let missing = ProcCgroupResolver::new(dir.join("nope"));
        assert_eq!(missing.owner(77), Err(ErrorKind::NotFound));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    proptest! {
        #[test]
        fn any_driver_layout_round_trips(
            uid in "[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}",
            cid in "[0-9a-f]{64}",
            systemd in any::<bool>(),
            qos in prop::sample::select(vec!["", "burstable", "besteffort"]),
            runtime in prop::sample::select(vec!["cri-containerd-", "crio-", "docker-"]),
        ) {
            let path = if systemd {
                let qos_part = if qos.is_empty() { String::new() } else { format!("kubepods-{qos}.slice/") };
                let pod_prefix = if qos.is_empty() { "kubepods".to_string() } else { format!("kubepods-{qos}") };
                format!("/kubepods.slice/{qos_part}{pod_prefix}-pod{}.slice/{runtime}{cid}.scope", uid.replace('-', "_"))
            } else {
                let qos_part = if qos.is_empty() { String::new() } else { format!("{qos}/") };
                format!("/kubepods/{qos_part}pod{uid}/{cid}")
            };
            let owner = parse_cgroup_file(&format!("0::{path}\n"));
            prop_assert_eq!(owner, Some(ProcessOwner { pod_uid: uid, container_id: Some(cid) }));
        }

        #[test]
        fn arbitrary_text_never_panics(text in "\\PC{0,200}") {
            let _ = parse_cgroup_file(&text);
        }
    }
}
