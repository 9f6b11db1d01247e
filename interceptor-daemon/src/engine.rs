//! The daemon's reconcile loop: one thread that brings what is attached in line with what is
//! wanted (the config's scopes and, in node agent mode, the pods that opt in), every
//! `rescan_interval` and at once when something changes (a pod event, a reload, a new cgroup
//! where a unit scope's cgroup lives: inotify). It only calls the library
//! (`attach`, `attach_inbound`, `register`, `detach_id`); the pins are the truth, so a
//! restarted daemon finds its scopes attached and updates them in place.
//!
//! Per scope and tick:
//! 1. resolve the cgroup (a path, a unit or slice name, a pod's kubelet cgroup); gone → the old
//!    scope is detached (its links act on nothing any more) and the scope waits;
//! 2. a cgroup whose id differs from the one attached (the unit was restarted, its cgroup
//!    recreated) or changed settings → `attach` (then the old id is detached);
//! 3. inbound: the namespace (a path, or that of a process in the cgroup) → `attach_inbound`
//!    when its inode changed; every second, while no listener is registered, `register` each
//!    process of the cgroup until one has the inbound listener.
use std::{
    collections::BTreeMap,
    os::unix::fs::MetadataExt as _,
    path::{Path, PathBuf},
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc, Condvar, Mutex,
    },
    time::{Duration, Instant},
};

use serde::Serialize;

use super::{
    config::{CgroupDriver, Target},
    resolve::{self, Qos},
};
use interceptor::{
    maps,
    netns::scope_id,
    paths::PinLayout,
    settings::{InboundSettings, ScopeSettings},
};

/// What a wanted scope's cgroup is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SpecTarget {
    /// A `[[scope]]` of the config.
    Config(Target),
    /// A pod's cgroup, as the kubelet names it.
    Pod { uid: String, qos: Option<Qos> },
}

/// Inbound interception of a scope.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct InboundSpec {
    /// The namespace file; `None`: the namespace of a process in the scope's cgroup.
    pub netns: Option<PathBuf>,
    pub settings: InboundSettings,
}

/// One scope the daemon should keep attached.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ScopeSpec {
    /// `scope/<name>` or `pod/<namespace>/<name>`.
    pub key: String,
    pub target: SpecTarget,
    pub settings: ScopeSettings,
    pub inbound: Option<InboundSpec>,
    /// Why it cannot be attached as asked (a bad annotation); it is then not attached.
    pub invalid: Option<String>,
}

/// What the daemon knows of one scope (served as JSON at `/scopes`).
#[derive(Clone, Debug, Default, Serialize)]
pub struct ScopeState {
    pub key: String,
    pub cgroup: Option<PathBuf>,
    pub cgroup_id: Option<u64>,
    pub netns: Option<PathBuf>,
    pub inbound_scope_id: Option<u64>,
    /// An inbound listener is registered (inbound scopes only).
    pub registered: bool,
    /// Interception is in place: outbound attached, and inbound when asked for.
    pub ready: bool,
    /// What it waits for, when not ready.
    pub waiting: Option<String>,
    pub last_error: Option<String>,
    /// A bad annotation on the running pod: refused, and the last good settings stay.
    pub invalid_annotation: Option<String>,
    /// How many times the scope was attached again to a recreated cgroup.
    pub reattached: u64,
    /// Milliseconds from noticing the new cgroup to its programs attached, last time.
    pub last_reattach_ms: Option<f64>,
}

/// State shared by the engine, the HTTP endpoints, the signal handler and the node agent.
#[derive(Default)]
pub struct Shared {
    config_scopes: Mutex<Vec<ScopeSpec>>,
    pods: Mutex<BTreeMap<String, ScopeSpec>>,
    states: Mutex<BTreeMap<String, ScopeState>>,
    wake: (Mutex<bool>, Condvar),
    last_tick: Mutex<Option<Instant>>,
    first_pass: AtomicBool,
    /// Node agent mode: the pod list has been read once.
    pub pods_synced: AtomicBool,
    stop: AtomicBool,
    detach_on_exit: AtomicBool,
    /// Bad annotation values seen (one per scope and distinct value).
    pub annotation_errors: AtomicU64,
    /// Passes of the reconcile loop done.
    pub passes: AtomicU64,
    /// Node agent mode: the start reconciliation waits for the pod list.
    pub agent: AtomicBool,
    /// Scopes detached by the start reconciliation (gone while the daemon was stopped).
    pub orphans_detached: AtomicU64,
    /// Entries of the scope table in use (outbound and inbound scopes), at the last pass.
    pub scope_table_used: AtomicU64,
}

impl Shared {
    pub fn new() -> Arc<Shared> {
        Arc::new(Shared::default())
    }

    fn wake(&self) {
        let (m, c) = &self.wake;
        *m.lock().unwrap() = true;
        c.notify_all();
    }

    /// Replaces the config's scopes (start and reload).
    pub fn set_config_scopes(&self, specs: Vec<ScopeSpec>, detach_on_exit: bool) {
        *self.config_scopes.lock().unwrap() = specs;
        self.detach_on_exit.store(detach_on_exit, Ordering::SeqCst);
        self.wake();
    }

    /// Replaces every pod (after a full list).
    pub fn set_pods(&self, pods: BTreeMap<String, ScopeSpec>) {
        *self.pods.lock().unwrap() = pods;
        self.wake();
    }

    /// Adds or updates one pod; `None` removes it.
    pub fn put_pod(&self, key: &str, spec: Option<ScopeSpec>) {
        let mut pods = self.pods.lock().unwrap();
        let changed = match spec {
            Some(s) => pods.insert(key.to_string(), s.clone()).as_ref() != Some(&s),
            None => pods.remove(key).is_some(),
        };
        drop(pods);
        if changed {
            self.wake();
        }
    }

    pub fn states(&self) -> BTreeMap<String, ScopeState> {
        self.states.lock().unwrap().clone()
    }

    pub fn state(&self, key: &str) -> Option<ScopeState> {
        self.states.lock().unwrap().get(key).cloned()
    }

    /// Time since the engine last finished a pass (`None` before the first).
    pub fn since_last_tick(&self) -> Option<Duration> {
        self.last_tick.lock().unwrap().map(|t| t.elapsed())
    }

    pub fn first_pass_done(&self) -> bool {
        self.first_pass.load(Ordering::SeqCst)
    }

    /// Asks the engine to stop (it finishes its pass first).
    pub fn stop(&self) {
        self.stop.store(true, Ordering::SeqCst);
        self.wake();
    }

    fn wanted(&self) -> Vec<ScopeSpec> {
        let mut v = self.config_scopes.lock().unwrap().clone();
        v.extend(self.pods.lock().unwrap().values().cloned());
        v
    }
}

/// Where names resolve.
#[derive(Clone, Debug)]
pub struct Resolver {
    /// Units and slices resolve under it (the cgroup2 mount by default).
    pub cgroup_root: PathBuf,
    /// The directory that holds kubepods / kubepods.slice.
    pub kubepods_parent: PathBuf,
    pub driver: CgroupDriver,
}

impl Resolver {
    fn cgroup(&self, t: &SpecTarget) -> Option<PathBuf> {
        match t {
            SpecTarget::Config(Target::Cgroup(p)) => p.is_dir().then(|| p.clone()),
            SpecTarget::Config(Target::Unit(u)) => resolve::unit_cgroup(&self.cgroup_root, u),
            SpecTarget::Config(Target::Slice(s)) => resolve::slice_cgroup(&self.cgroup_root, s),
            SpecTarget::Pod { uid, qos } => {
                resolve::pod_cgroup(&self.kubepods_parent, self.driver, *qos, uid)
            }
        }
    }
}

/// What is attached for one scope.
struct Live {
    spec: ScopeSpec,
    /// Attached cgroup: id and path.
    out: Option<(u64, PathBuf)>,
    /// Attached namespace: scope id and the path it was attached by.
    inb: Option<(u64, PathBuf)>,
    /// A pod's network namespace (its inode), fixed at its first attach: the sandbox's.
    /// A process of the pod in another namespace (`unshare -n`) never moves it.
    netns_ino: Option<u64>,
    registered: bool,
    /// A unit's cgroup as last found: looked for there first after a restart, and its
    /// parent directory watched for the new one.
    last_dir: Option<PathBuf>,
    next_register: Instant,
    next_search: Instant,
    retry_at: Option<Instant>,
    state: ScopeState,
}

const REGISTER_EVERY: Duration = Duration::from_secs(1);
const RETRY_AFTER: Duration = Duration::from_secs(1);
const SEARCH_EVERY: Duration = Duration::from_secs(1);

/// Wakes the engine as soon as a cgroup is made in a directory that holds a unit scope's
/// cgroup (`system.slice` for most): a restarted unit's new cgroup is attached at once, not
/// at the next rescan. Without inotify the rescan alone finds it.
struct CgroupWatch(Option<Arc<nix::sys::inotify::Inotify>>);

impl CgroupWatch {
    fn start(shared: Arc<Shared>) -> CgroupWatch {
        use nix::sys::inotify::{AddWatchFlags, InitFlags, Inotify};
        let ino = match Inotify::init(InitFlags::IN_CLOEXEC) {
            Ok(i) => Arc::new(i),
            Err(e) => {
                tracing::warn!(error = %e, "inotify unavailable: a restarted unit's cgroup is found at the next rescan");
                return CgroupWatch(None);
            }
        };
        let reader = ino.clone();
        // Not joined: it blocks reading events until the process exits.
        let started = std::thread::Builder::new()
            .name("cgroup-watch".into())
            .spawn(move || loop {
                match reader.read_events() {
                    Ok(ev) => {
                        if ev.iter().any(|e| e.mask.contains(AddWatchFlags::IN_CREATE)) {
                            shared.wake();
                        }
                    }
                    Err(nix::errno::Errno::EINTR) => {}
                    Err(e) => {
                        tracing::warn!(error = %e, "reading cgroup events; restarted units are found at the rescan");
                        return;
                    }
                }
            });
        match started {
            Ok(_) => CgroupWatch(Some(ino)),
            Err(e) => {
                tracing::warn!(error = %e, "starting the cgroup watch thread");
                CgroupWatch(None)
            }
        }
    }

    /// Watches `dir` for new cgroups (again each pass: cheap, and a directory made anew
    /// needs a new watch).
    fn watch(&self, dir: &Path) {
        use nix::sys::inotify::AddWatchFlags;
        if let Some(i) = &self.0 {
            let _ = i.add_watch(dir, AddWatchFlags::IN_CREATE | AddWatchFlags::IN_ONLYDIR);
        }
    }
}

/// The reconcile loop; returns when [`Shared::stop`] is called.
pub fn run(shared: Arc<Shared>, layout: PinLayout, resolver: Resolver, interval: Duration) {
    let mut live: BTreeMap<String, Live> = BTreeMap::new();
    let watch = CgroupWatch::start(shared.clone());
    let mut reconciled = false;
    loop {
        let stopping = shared.stop.load(Ordering::SeqCst);
        if stopping {
            break;
        }
        // Read before the wanted scopes: the pods are set before the flag, so a snapshot
        // taken after it holds them (the reconciliation must never run on a list without them).
        let agent = shared.agent.load(Ordering::SeqCst);
        let synced = !agent || shared.pods_synced.load(Ordering::SeqCst);
        let wanted = shared.wanted();
        pass(&shared, &layout, &resolver, &wanted, &mut live);
        for l in live.values() {
            if let (SpecTarget::Config(Target::Unit(_)), Some(dir)) = (&l.spec.target, &l.last_dir)
            {
                if let Some(parent) = dir.parent() {
                    watch.watch(parent);
                }
            }
        }
        if !reconciled && synced {
            reconciled = true;
            let n = reconcile(&layout, &resolver, &wanted, &live, agent);
            shared.orphans_detached.fetch_add(n, Ordering::SeqCst);
            // systemd: ready once the first pass over the complete wanted set is done.
            // (sd_notify: one datagram to `$NOTIFY_SOCKET`; nothing without it.)
            if std::env::var_os("NOTIFY_SOCKET").is_some() {
                match sd_notify::notify(&[sd_notify::NotifyState::Ready]) {
                    Ok(()) => tracing::info!("told systemd: READY=1 (first attach pass done)"),
                    Err(e) => tracing::warn!(error = %e, "sending READY=1 to $NOTIFY_SOCKET"),
                }
            }
        }
        if let (Ok(o), Ok(i)) = (
            maps::read_scopes(&layout),
            maps::read_inbound_scopes(&layout),
        ) {
            shared
                .scope_table_used
                .store((o.len() + i.len()) as u64, Ordering::SeqCst);
        }
        *shared.states.lock().unwrap() = live
            .iter()
            .map(|(k, l)| (k.clone(), l.state.clone()))
            .collect();
        *shared.last_tick.lock().unwrap() = Some(Instant::now());
        shared.first_pass.store(true, Ordering::SeqCst);
        shared.passes.fetch_add(1, Ordering::SeqCst);
        // Until the next rescan, or sooner when a failed attach is due again ("retrying in
        // 1 s" holds with a long rescan interval too).
        let now = Instant::now();
        let wait = live
            .values()
            .filter_map(|l| l.retry_at.filter(|t| *t > now))
            .map(|t| t - now)
            .fold(interval, Duration::min);
        let (m, c) = &shared.wake;
        let mut woken = m.lock().unwrap();
        if !*woken {
            woken = c.wait_timeout(woken, wait).unwrap().0;
        }
        *woken = false;
    }
    if shared.detach_on_exit.load(Ordering::SeqCst) {
        for (key, l) in live.iter_mut() {
            tracing::info!(scope = %key, "detaching on exit (detach_on_exit = true)");
            detach_all_of(&layout, l);
        }
    } else {
        tracing::info!(
            scopes = live.len(),
            "exiting; interception stays in place (detach_on_exit = false)"
        );
    }
}

fn pass(
    shared: &Shared,
    layout: &PinLayout,
    r: &Resolver,
    wanted: &[ScopeSpec],
    live: &mut BTreeMap<String, Live>,
) {
    let keys: Vec<String> = live.keys().cloned().collect();
    for key in keys {
        if !wanted.iter().any(|s| s.key == key) {
            let mut l = live.remove(&key).expect("key listed");
            tracing::info!(scope = %key, "no longer wanted: detaching");
            detach_all_of(layout, &mut l);
        }
    }
    // One read of the inbound scopes per pass tells which have a listener registered.
    let registered: Option<Vec<maps::StoredInbound>> = if live.values().any(|l| l.inb.is_some())
        || wanted.iter().any(|s| {
            s.inbound.as_ref().is_some_and(|i| i.netns.is_none())
                && live.get(&s.key).is_none_or(|l| l.netns_ino.is_none())
        }) {
        maps::read_inbound_scopes(layout).ok()
    } else {
        None
    };
    // Scopes that may hold others (slices, cgroup paths), resolved first: a scope inside one
    // of them is refused, whatever their order.
    let outer: Vec<(String, PathBuf)> = wanted
        .iter()
        .filter(|s| {
            s.invalid.is_none()
                && matches!(
                    s.target,
                    SpecTarget::Config(Target::Slice(_) | Target::Cgroup(_))
                )
        })
        .filter_map(|s| Some((s.key.clone(), r.cgroup(&s.target)?)))
        .collect();
    for spec in wanted {
        let l = live.entry(spec.key.clone()).or_insert_with(|| Live {
            spec: spec.clone(),
            out: None,
            inb: None,
            netns_ino: None,
            registered: false,
            last_dir: None,
            next_register: Instant::now(),
            next_search: Instant::now(),
            retry_at: None,
            state: ScopeState {
                key: spec.key.clone(),
                ..ScopeState::default()
            },
        });
        // A bad annotation on a scope that runs with good settings: refused, logged once per
        // value and counted; the last good settings stay (Istio reads annotations only at
        // injection; we follow changes, but never by detaching a running pod).
        let spec = match &spec.invalid {
            Some(why) if l.out.is_some() && l.spec.invalid.is_none() => {
                if l.state.invalid_annotation.as_deref() != Some(why) {
                    tracing::error!(scope = %spec.key, error = %why, "invalid annotation on a running pod: refused; the last good settings stay in force");
                    shared.annotation_errors.fetch_add(1, Ordering::SeqCst);
                    l.state.invalid_annotation = Some(why.clone());
                }
                l.spec.clone()
            }
            Some(why) => {
                if l.state.invalid_annotation.as_deref() != Some(why) {
                    tracing::error!(scope = %spec.key, error = %why, "invalid annotation: the pod is not attached until it is fixed");
                    shared.annotation_errors.fetch_add(1, Ordering::SeqCst);
                    l.state.invalid_annotation = Some(why.clone());
                }
                spec.clone()
            }
            None => {
                l.state.invalid_annotation = None;
                spec.clone()
            }
        };
        let spec = &spec;
        let changed = l.spec != *spec;
        if changed {
            l.spec = spec.clone();
            l.retry_at = None;
        }
        if let (Some(reg), Some((id, _))) = (&registered, &l.inb) {
            l.registered = reg.iter().any(|s| s.id == *id && !s.registered.is_empty());
        }
        let stored: Vec<u64> = registered
            .as_ref()
            .map(|v| v.iter().map(|s| s.id).collect())
            .unwrap_or_default();
        scope_pass(layout, r, l, changed, &stored, &outer);
        l.state.registered = l.registered;
        l.state.cgroup_id = l.out.as_ref().map(|o| o.0);
        l.state.inbound_scope_id = l.inb.as_ref().map(|i| i.0);
        l.state.ready = l.state.waiting.is_none()
            && l.out.is_some()
            && (l.spec.inbound.is_none() || l.inb.is_some());
    }
}

/// The start reconciliation (once the wanted scopes are known: at once, or in node agent mode
/// once the pod list is read): the pins are the truth. Detached, of what no live scope holds:
/// an outbound scope whose cgroup is gone or was recreated (it acts on nothing and only holds
/// a slot of the scope table); in node agent mode, a scope under the kubepods hierarchy that
/// is no wanted pod's cgroup, and an inbound scope the agent made (`/proc/PID/ns/net`) whose
/// namespace no longer answers at that path. Scopes of other owners with live cgroups or
/// namespaces are left alone. Returns how many were detached.
fn reconcile(
    layout: &PinLayout,
    r: &Resolver,
    wanted: &[ScopeSpec],
    live: &BTreeMap<String, Live>,
    agent: bool,
) -> u64 {
    let held: Vec<u64> = live
        .values()
        .flat_map(|l| [l.out.as_ref().map(|o| o.0), l.inb.as_ref().map(|i| i.0)])
        .flatten()
        .collect();
    let wanted_cgroups: Vec<PathBuf> = wanted.iter().filter_map(|s| r.cgroup(&s.target)).collect();
    let is_pod_cgroup = |p: &Path| {
        p.strip_prefix(&r.kubepods_parent)
            .ok()
            .and_then(|rel| rel.components().next())
            .is_some_and(|c| {
                let c = c.as_os_str().to_string_lossy();
                c == "kubepods" || c == "kubepods.slice"
            })
    };
    let mut n = 0;
    let mut detach = |id: u64, what: &str, path: &str| {
        tracing::info!(
            id,
            path,
            reason = what,
            "start reconciliation: detaching an orphaned scope"
        );
        match interceptor::detach_id(layout, id) {
            Ok(_) => n += 1,
            Err(e) => tracing::warn!(id, path, error = %e, "start reconciliation: detaching"),
        }
    };
    match maps::read_scopes(layout) {
        Ok(scopes) => {
            for s in scopes.iter().filter(|s| !held.contains(&s.id)) {
                let p = Path::new(&s.path);
                let current = std::fs::metadata(p).ok().map(|m| m.ino());
                if current != Some(s.id) {
                    detach(s.id, "its cgroup is gone", &s.path);
                } else if agent && is_pod_cgroup(p) && !wanted_cgroups.iter().any(|w| w == p) {
                    detach(s.id, "no pod on this node wants it", &s.path);
                }
            }
        }
        Err(e) => tracing::warn!(error = %e, "start reconciliation: reading the scopes"),
    }
    match maps::read_inbound_scopes(layout) {
        Ok(scopes) => {
            for s in scopes.iter().filter(|s| !held.contains(&s.id)) {
                let agent_made = s
                    .path
                    .strip_prefix("/proc/")
                    .and_then(|t| t.strip_suffix("/ns/net"))
                    .is_some_and(|pid| pid.parse::<u32>().is_ok());
                let current = std::fs::metadata(&s.path).ok().map(|m| scope_id(m.ino()));
                if agent && agent_made && current != Some(s.id) {
                    detach(s.id, "its pod's namespace is gone", &s.path);
                }
            }
        }
        Err(e) => tracing::warn!(error = %e, "start reconciliation: reading the inbound scopes"),
    }
    tracing::info!(detached = n, "start reconciliation done");
    n
}

fn detach_quietly(layout: &PinLayout, id: u64, key: &str) {
    if let Err(e) = interceptor::detach_id(layout, id) {
        tracing::warn!(scope = %key, id, error = %e, "detaching");
    }
}

fn detach_all_of(layout: &PinLayout, l: &mut Live) {
    if let Some((id, _)) = l.out.take() {
        detach_quietly(layout, id, &l.spec.key);
    }
    if let Some((id, _)) = l.inb.take() {
        detach_quietly(layout, id, &l.spec.key);
    }
    l.netns_ino = None;
}

/// The scope's cgroup. A unit found by searching the tree is looked for again at its last
/// path first (a restarted unit's cgroup comes back there), and the search itself runs at
/// most once a second (it may read many directories).
fn resolve_cgroup(r: &Resolver, l: &mut Live) -> Option<PathBuf> {
    if let SpecTarget::Config(Target::Unit(_)) = &l.spec.target {
        if let Some(p) = l.last_dir.as_ref().filter(|p| p.is_dir()) {
            return Some(p.clone());
        }
        let direct = r.cgroup_root.join("system.slice");
        if let SpecTarget::Config(Target::Unit(u)) = &l.spec.target {
            if direct.join(u).is_dir() {
                return Some(direct.join(u));
            }
        }
        if Instant::now() < l.next_search {
            return None;
        }
        l.next_search = Instant::now() + SEARCH_EVERY;
    }
    r.cgroup(&l.spec.target)
}

/// The scope of `outer` that holds `path`, if any: a strict ancestor, or the same cgroup
/// under a key that sorts first (one of two scopes of one cgroup is kept).
fn enclosing<'a>(
    outer: &'a [(String, PathBuf)],
    key: &str,
    path: &Path,
) -> Option<&'a (String, PathBuf)> {
    outer
        .iter()
        .find(|(k, p)| k != key && path.starts_with(p) && (path != p.as_path() || k.as_str() < key))
}

fn scope_pass(
    layout: &PinLayout,
    r: &Resolver,
    l: &mut Live,
    changed: bool,
    stored: &[u64],
    outer: &[(String, PathBuf)],
) {
    let key = l.spec.key.clone();
    if let Some(why) = l.spec.invalid.clone() {
        // Only a scope never attached with good settings gets here: nothing of it is
        // touched (a scope a previous run attached stays as it is).
        l.state.waiting = Some(format!("not attached: {why}"));
        return;
    }
    let Some(path) = resolve_cgroup(r, l) else {
        if l.out.is_some() {
            tracing::info!(scope = %key, "cgroup gone: detaching its links");
        }
        detach_all_of(layout, l);
        l.state.cgroup = None;
        l.state.waiting = Some("cgroup not found (unit not running, pod not started yet)".into());
        return;
    };
    l.state.cgroup = Some(path.clone());
    l.last_dir = Some(path.clone());
    // Scopes cannot be nested: the connect programs of a cgroup run before its ancestors',
    // and an ancestor's program removes the record of a connect it finds already sent to
    // the proxy, so the proxy would reset every connection of the inner scope. The outer
    // scope already intercepts this cgroup (with its own settings): the inner one is refused.
    if let Some((k, p)) = enclosing(outer, &key, &path) {
        let why = format!(
            "not attached: its cgroup is inside scope {k} ({}), which already intercepts it; scopes cannot be nested (the outer one's programs would drop this one's records): remove one of the two from the config",
            p.display()
        );
        if l.state.waiting.as_deref() != Some(why.as_str()) {
            tracing::error!(scope = %key, cgroup = %path.display(), outer = %k, "scope inside another scope: refused");
        }
        if l.out.is_some() || l.inb.is_some() {
            detach_all_of(layout, l);
        }
        l.state.last_error = Some(why.clone());
        l.state.waiting = Some(why);
        return;
    }
    let Ok(ino) = std::fs::metadata(&path).map(|m| m.ino()) else {
        l.state.waiting = Some("cgroup vanished while resolving it".into());
        return;
    };
    if l.retry_at.is_some_and(|t| Instant::now() < t) && !changed {
        return;
    }
    let noticed = Instant::now();
    let recreated = l.out.as_ref().is_some_and(|(id, _)| *id != ino);
    if l.out.is_none() || recreated || changed {
        match interceptor::attach(layout, &path, &l.spec.settings) {
            Ok(done) => {
                let ms = noticed.elapsed().as_secs_f64() * 1000.0;
                if let Some((old, _)) = l.out.take().filter(|(old, _)| *old != done.cgroup.id) {
                    detach_quietly(layout, old, &key);
                    l.state.reattached += 1;
                    l.state.last_reattach_ms = Some(ms);
                    tracing::info!(scope = %key, cgroup = %path.display(), old_id = old, new_id = done.cgroup.id, attach_ms = format!("{ms:.1}"), "cgroup recreated: attached again");
                } else {
                    tracing::info!(scope = %key, cgroup = %path.display(), id = done.cgroup.id, updated = !done.created, "attached");
                }
                l.out = Some((done.cgroup.id, path.clone()));
                l.state.last_error = None;
                l.retry_at = None;
            }
            Err(e) => {
                tracing::warn!(scope = %key, cgroup = %path.display(), error = %e, "attach failed; retrying in 1 s");
                l.state.last_error = Some(e.to_string());
                l.state.waiting = Some("attach failed".into());
                l.retry_at = Some(Instant::now() + RETRY_AFTER);
                return;
            }
        }
    }
    l.state.waiting = None;
    let Some(ib) = l.spec.inbound.clone() else {
        if let Some((id, _)) = l.inb.take() {
            detach_quietly(layout, id, &key);
        }
        return;
    };
    inbound_pass(layout, l, &path, &ib, changed, stored);
}

/// A process's start time (clock ticks after boot), to find a pod's oldest process.
fn start_time(pid: i32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Field 22; the command (field 2) may hold spaces, so count after its closing paren.
    stat.rsplit_once(')')?
        .1
        .split_whitespace()
        .nth(19)?
        .parse()
        .ok()
}

/// The network namespace of a pod (a scope whose namespace is not given): the one fixed at
/// its first attach, found again through any process of the pod still in it. Not fixed yet:
/// one already attached by a previous run (a restarted agent adopts it), else that of the
/// pod's oldest process (the sandbox's, made first). Returns the namespace's path and inode.
fn pod_netns(l: &mut Live, cgroup: &Path, stored: &[u64]) -> Result<(PathBuf, u64), String> {
    let ns_of = |pid: i32| {
        let p = PathBuf::from(format!("/proc/{pid}/ns/net"));
        std::fs::metadata(&p).ok().map(|m| (pid, p, m.ino()))
    };
    if let Some(fixed) = l.netns_ino {
        if let Some((_, p)) = l.inb.as_ref().filter(|(id, _)| *id == scope_id(fixed)) {
            if std::fs::metadata(p).is_ok_and(|m| m.ino() == fixed) {
                return Ok((p.clone(), fixed));
            }
        }
        return resolve::cgroup_pids(cgroup)
            .into_iter()
            .filter_map(ns_of)
            .find(|(_, _, ino)| *ino == fixed)
            .map(|(_, p, ino)| (p, ino))
            .ok_or_else(|| {
                "no process of the pod is left in its network namespace (the sandbox's)".into()
            });
    }
    let procs: Vec<(i32, PathBuf, u64)> = resolve::cgroup_pids(cgroup)
        .into_iter()
        .filter_map(ns_of)
        .collect();
    let chosen = procs
        .iter()
        .find(|(_, _, ino)| stored.contains(&scope_id(*ino)))
        .or_else(|| {
            procs
                .iter()
                .min_by_key(|(pid, _, _)| (start_time(*pid).unwrap_or(u64::MAX), *pid))
        })
        .ok_or_else(|| "no process in the cgroup yet (its network namespace)".to_string())?;
    l.netns_ino = Some(chosen.2);
    Ok((chosen.1.clone(), chosen.2))
}

fn inbound_pass(
    layout: &PinLayout,
    l: &mut Live,
    cgroup: &Path,
    ib: &InboundSpec,
    changed: bool,
    stored: &[u64],
) {
    let key = l.spec.key.clone();
    let ns_path = match &ib.netns {
        Some(p) => p.clone(),
        None => match pod_netns(l, cgroup, stored) {
            Ok((p, _)) => p,
            Err(why) => {
                l.state.waiting = Some(why);
                return;
            }
        },
    };
    let Ok(ino) = std::fs::metadata(&ns_path).map(|m| m.ino()) else {
        l.state.waiting = Some(format!("network namespace {} not found", ns_path.display()));
        return;
    };
    let id = scope_id(ino);
    l.state.netns = Some(ns_path.clone());
    if l.inb.as_ref().map(|i| i.0) != Some(id) || changed {
        match interceptor::attach_inbound(layout, &ns_path, &ib.settings) {
            Ok(done) => {
                if let Some((old, _)) = l.inb.take().filter(|(old, _)| *old != done.scope_id) {
                    detach_quietly(layout, old, &key);
                }
                tracing::info!(scope = %key, netns = %ns_path.display(), "attached inbound");
                l.inb = Some((done.scope_id, ns_path.clone()));
                l.registered = false;
                l.next_register = Instant::now();
            }
            Err(e) => {
                tracing::warn!(scope = %key, netns = %ns_path.display(), error = %e, "inbound attach failed; retrying in 1 s");
                l.state.last_error = Some(e.to_string());
                l.state.waiting = Some("inbound attach failed".into());
                l.retry_at = Some(Instant::now() + RETRY_AFTER);
                return;
            }
        }
    }
    if !l.registered && Instant::now() >= l.next_register {
        l.next_register = Instant::now() + REGISTER_EVERY;
        for pid in resolve::cgroup_pids(cgroup).into_iter().take(64) {
            if let Ok(done) = interceptor::register(layout, &ns_path, pid) {
                tracing::info!(scope = %key, pid, listeners = done.len(), "registered the proxy's inbound listener");
                l.registered = true;
                break;
            }
        }
    }
}
