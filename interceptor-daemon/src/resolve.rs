//! Turning names into cgroups: systemd units and slices, and the cgroups the kubelet makes
//! for pods (both cgroup drivers). Nothing here needs a running systemd or kubelet: names
//! are resolved against the cgroup directories that exist.
use std::{
    fs,
    path::{Path, PathBuf},
};

use super::config::CgroupDriver;

/// The cgroup path of a slice: `a-b-c.slice` → `a.slice/a-b.slice/a-b-c.slice` (systemd's
/// nesting by dashes); `-.slice` is the root.
pub fn slice_path(slice: &str) -> PathBuf {
    let stem = slice.strip_suffix(".slice").unwrap_or(slice);
    let mut out = PathBuf::new();
    if stem == "-" || stem.is_empty() {
        return out;
    }
    let parts: Vec<&str> = stem.split('-').collect();
    for i in 1..=parts.len() {
        out.push(format!("{}.slice", parts[..i].join("-")));
    }
    out
}

/// The cgroup of unit `unit` under `root`: `system.slice/<unit>` where systemd puts services
/// by default, else the first directory of that name found under `root` (a unit with
/// `Slice=`, a user unit), searched breadth first, at most 5 levels and 20,000 directories.
pub fn unit_cgroup(root: &Path, unit: &str) -> Option<PathBuf> {
    let direct = root.join("system.slice").join(unit);
    if direct.is_dir() {
        return Some(direct);
    }
    let mut level = vec![root.to_path_buf()];
    let mut seen = 0usize;
    for _ in 0..5 {
        let mut next = Vec::new();
        for dir in &level {
            let Ok(rd) = fs::read_dir(dir) else { continue };
            for e in rd.flatten() {
                if !e.file_type().is_ok_and(|t| t.is_dir()) {
                    continue;
                }
                seen += 1;
                if seen > 20_000 {
                    return None;
                }
                if e.file_name() == unit {
                    return Some(e.path());
                }
                next.push(e.path());
            }
        }
        level = next;
    }
    None
}

/// The cgroup of slice `slice` under `root`, if it exists.
pub fn slice_cgroup(root: &Path, slice: &str) -> Option<PathBuf> {
    let p = root.join(slice_path(slice));
    p.is_dir().then_some(p)
}

/// A pod's QoS class, as the kubelet names its cgroups.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Qos {
    Guaranteed,
    Burstable,
    BestEffort,
}

impl Qos {
    /// From the pod's `status.qosClass`.
    pub fn from_class(c: &str) -> Option<Qos> {
        match c {
            "Guaranteed" => Some(Qos::Guaranteed),
            "Burstable" => Some(Qos::Burstable),
            "BestEffort" => Some(Qos::BestEffort),
            _ => None,
        }
    }

    fn dir(self) -> Option<&'static str> {
        match self {
            Qos::Guaranteed => None,
            Qos::Burstable => Some("burstable"),
            Qos::BestEffort => Some("besteffort"),
        }
    }
}

/// Where the kubelet puts the cgroup of the pod with `uid` and `qos`, relative to the
/// directory that holds the kubepods hierarchy:
///
/// - systemd driver: `kubepods.slice/kubepods-<qos>.slice/kubepods-<qos>-pod<uid with _>.slice`
///   (Guaranteed pods directly under `kubepods.slice`: `kubepods-pod<uid>.slice`);
/// - cgroupfs driver: `kubepods/<qos>/pod<uid>` (Guaranteed: `kubepods/pod<uid>`).
pub fn pod_cgroup_rel(driver: CgroupDriver, qos: Qos, uid: &str) -> PathBuf {
    match driver {
        CgroupDriver::Systemd | CgroupDriver::Auto => {
            let uid = uid.replace('-', "_");
            match qos.dir() {
                None => PathBuf::from(format!("kubepods.slice/kubepods-pod{uid}.slice")),
                Some(q) => PathBuf::from(format!(
                    "kubepods.slice/kubepods-{q}.slice/kubepods-{q}-pod{uid}.slice"
                )),
            }
        }
        CgroupDriver::Cgroupfs => match qos.dir() {
            None => PathBuf::from(format!("kubepods/pod{uid}")),
            Some(q) => PathBuf::from(format!("kubepods/{q}/pod{uid}")),
        },
    }
}

/// Finds the cgroup of a pod under `parent`: with its QoS class when known (else every
/// class), with the driver given (`Auto`: systemd names, then cgroupfs names).
pub fn pod_cgroup(
    parent: &Path,
    driver: CgroupDriver,
    qos: Option<Qos>,
    uid: &str,
) -> Option<PathBuf> {
    let drivers: &[CgroupDriver] = match driver {
        CgroupDriver::Auto => &[CgroupDriver::Systemd, CgroupDriver::Cgroupfs],
        CgroupDriver::Systemd => &[CgroupDriver::Systemd],
        CgroupDriver::Cgroupfs => &[CgroupDriver::Cgroupfs],
    };
    let classes: Vec<Qos> = match qos {
        Some(q) => vec![q],
        None => vec![Qos::Burstable, Qos::BestEffort, Qos::Guaranteed],
    };
    for d in drivers {
        for q in &classes {
            let p = parent.join(pod_cgroup_rel(*d, *q, uid));
            if p.is_dir() {
                return Some(p);
            }
        }
    }
    None
}

/// Pids in the cgroup `dir` and its descendants (at most 8 levels deep), in a stable order:
/// the cgroup's own first, then its children's by name.
pub fn cgroup_pids(dir: &Path) -> Vec<i32> {
    fn walk(dir: &Path, depth: usize, out: &mut Vec<i32>) {
        if let Ok(s) = fs::read_to_string(dir.join("cgroup.procs")) {
            out.extend(s.lines().filter_map(|l| l.trim().parse::<i32>().ok()));
        }
        if depth >= 8 {
            return;
        }
        let Ok(rd) = fs::read_dir(dir) else { return };
        let mut children: Vec<PathBuf> = rd
            .flatten()
            .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
            .map(|e| e.path())
            .collect();
        children.sort();
        for c in children {
            walk(&c, depth + 1, out);
        }
    }
    let mut out = Vec::new();
    walk(dir, 0, &mut out);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slices_nest_by_dash() {
        assert_eq!(slice_path("app.slice"), PathBuf::from("app.slice"));
        assert_eq!(
            slice_path("a-b-c.slice"),
            PathBuf::from("a.slice/a-b.slice/a-b-c.slice")
        );
        assert_eq!(slice_path("-.slice"), PathBuf::new());
    }

    #[test]
    fn kubelet_names() {
        let uid = "6f2c3a1e-1b2c-4d5e-8f90-0123456789ab";
        assert_eq!(
            pod_cgroup_rel(CgroupDriver::Systemd, Qos::Burstable, uid),
            PathBuf::from("kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod6f2c3a1e_1b2c_4d5e_8f90_0123456789ab.slice")
        );
        assert_eq!(
            pod_cgroup_rel(CgroupDriver::Systemd, Qos::Guaranteed, uid),
            PathBuf::from("kubepods.slice/kubepods-pod6f2c3a1e_1b2c_4d5e_8f90_0123456789ab.slice")
        );
        assert_eq!(
            pod_cgroup_rel(CgroupDriver::Cgroupfs, Qos::BestEffort, uid),
            PathBuf::from(format!("kubepods/besteffort/pod{uid}"))
        );
        assert_eq!(
            pod_cgroup_rel(CgroupDriver::Cgroupfs, Qos::Guaranteed, uid),
            PathBuf::from(format!("kubepods/pod{uid}"))
        );
        assert_eq!(Qos::from_class("Burstable"), Some(Qos::Burstable));
        assert_eq!(Qos::from_class("x"), None);
    }

    #[test]
    fn finds_units_and_pods_in_a_directory_tree() {
        // Plain directories stand in for cgroups: resolution only looks at names.
        let base = std::env::temp_dir().join(format!("icpt-resolve-{}", std::process::id()));
        let _ = fs::remove_dir_all(&base);
        let uid = "0000aaaa-1111-2222-3333-444455556666";
        for d in [
            "system.slice/nginx.service",
            "app.slice/app-web.slice/web.service",
            "kubepods/besteffort/pod0000aaaa-1111-2222-3333-444455556666",
        ] {
            fs::create_dir_all(base.join(d)).unwrap();
        }
        assert_eq!(
            unit_cgroup(&base, "nginx.service"),
            Some(base.join("system.slice/nginx.service"))
        );
        assert_eq!(
            unit_cgroup(&base, "web.service"),
            Some(base.join("app.slice/app-web.slice/web.service"))
        );
        assert_eq!(unit_cgroup(&base, "nope.service"), None);
        assert_eq!(
            slice_cgroup(&base, "app-web.slice"),
            Some(base.join("app.slice/app-web.slice"))
        );
        assert_eq!(
            pod_cgroup(&base, CgroupDriver::Auto, None, uid),
            Some(base.join(format!("kubepods/besteffort/pod{uid}")))
        );
        assert_eq!(pod_cgroup(&base, CgroupDriver::Systemd, None, uid), None);
        fs::remove_dir_all(&base).unwrap();
    }
}
