//! Access to the pinned maps, and the per-scope entries the loader keeps in them.
use std::{
    collections::{BTreeMap, BTreeSet},
    net::{Ipv4Addr, Ipv6Addr},
    path::Path,
};

use aya::maps::{
    lpm_trie::{Key, LpmTrie},
    Array, HashMap, Map, MapData, PerCpuHashMap, SockHash,
};
use interceptor_common::{
    maps as names, Counter, CounterKey, InboundConfig, ScopeConfig, ScopeMeta, ScopedV4, ScopedV6,
    ScopedValue, SockKey, AF_INET, AF_INET6, FLAG_FAIL_OPEN, FLAG_INCLUDE4, FLAG_INCLUDE6,
    FLAG_INCLUDE_PORTS, FLAG_PROXY_MARKED, IN_PORT_EXCLUDED, IN_PORT_INCLUDED, LAYOUT_VERSION,
    LPM_SCOPE_BITS, META_PATH_LEN,
};
use ipnet::{IpNet, Ipv4Net, Ipv6Net};

use crate::{
    error::{Error, Result},
    paths::PinLayout,
    settings::{InboundSettings, ProxyDown, ProxyListener, ScopeSettings},
};

fn open(layout: &PinLayout, name: &str) -> Result<MapData> {
    let path = layout.map(name);
    MapData::from_pin(&path)
        .map_err(|e| Error::bpf(format!("opening pinned map {}", path.display()), e))
}

fn typed<T>(layout: &PinLayout, name: &str, wrap: fn(MapData) -> Map) -> Result<T>
where
    T: TryFrom<Map, Error = aya::maps::MapError>,
{
    let map = wrap(open(layout, name)?);
    T::try_from(map).map_err(|e| Error::bpf(format!("map {name}"), e))
}

fn map_err(what: &str) -> impl Fn(aya::maps::MapError) -> Error + '_ {
    move |e| Error::bpf(what.to_string(), e)
}

/// Reads the layout version stored in the pinned maps: `None` when nothing is pinned yet.
pub fn stored_layout(layout: &PinLayout) -> Result<Option<u32>> {
    if !layout.map(names::LAYOUT).exists() {
        return Ok(None);
    }
    let arr: Array<MapData, u32> = typed(layout, names::LAYOUT, Map::Array)?;
    let v = arr.get(&0, 0).map_err(map_err("reading ICP_LAYOUT"))?;
    Ok(Some(v))
}

/// Refuses pinned maps of another layout (0 means "freshly created, not yet stamped").
pub fn check_layout(layout: &PinLayout) -> Result<()> {
    match stored_layout(layout)? {
        None | Some(0) => Ok(()),
        Some(v) if v == LAYOUT_VERSION => Ok(()),
        Some(found) => Err(Error::LayoutMismatch {
            path: layout.maps_dir(),
            found,
            expected: LAYOUT_VERSION,
        }),
    }
}

pub fn stamp_layout(layout: &PinLayout) -> Result<()> {
    let mut arr: Array<MapData, u32> = typed(layout, names::LAYOUT, Map::Array)?;
    arr.set(0, LAYOUT_VERSION, 0)
        .map_err(map_err("writing ICP_LAYOUT"))
}

/// Whether kernel forwarding's verdict was attached to `ICP_FWD` (`ICP_FWD_READY` set).
pub fn forwarding_ready(layout: &PinLayout) -> Result<bool> {
    if !layout.map(names::FWD_READY).exists() {
        return Ok(false);
    }
    let arr: Array<MapData, u32> = typed(layout, names::FWD_READY, Map::Array)?;
    Ok(arr.get(&0, 0).map_err(map_err("reading ICP_FWD_READY"))? == 1)
}

/// Records that kernel forwarding's verdict is attached to `ICP_FWD` (`ICP_FWD_READY`): the
/// programs answer the proxy's `SO_ICP_KFWD` from now on.
pub fn mark_forwarding_ready(layout: &PinLayout) -> Result<()> {
    let mut arr: Array<MapData, u32> = typed(layout, names::FWD_READY, Map::Array)?;
    arr.set(0, 1, 0).map_err(map_err("writing ICP_FWD_READY"))
}

fn v4_key(scope: u64, net: &Ipv4Net) -> Key<ScopedV4> {
    Key::new(
        LPM_SCOPE_BITS + net.prefix_len() as u32,
        ScopedV4 {
            scope: scope.to_be_bytes(),
            addr: net.addr().octets(),
        },
    )
}

fn v6_key(scope: u64, net: &Ipv6Net) -> Key<ScopedV6> {
    Key::new(
        LPM_SCOPE_BITS + net.prefix_len() as u32,
        ScopedV6 {
            scope: scope.to_be_bytes(),
            addr: net.addr().octets(),
        },
    )
}

fn scoped(scope: u64, value: u32) -> ScopedValue {
    ScopedValue {
        scope,
        value,
        _pad: 0,
    }
}

/// Replaces the entries of a scoped set: new ones first, stale ones last, so that no
/// connect() sees an exclusion missing while the scope is updated.
fn sync_set(
    map: &mut HashMap<MapData, ScopedValue, u8>,
    scope: u64,
    wanted: &BTreeSet<u32>,
    what: &str,
) -> Result<()> {
    for v in wanted {
        map.insert(scoped(scope, *v), 1, 0).map_err(map_err(what))?;
    }
    let stale: Vec<ScopedValue> = map
        .keys()
        .filter_map(|k| k.ok())
        .filter(|k| k.scope == scope && !wanted.contains(&k.value))
        .collect();
    for k in stale {
        let _ = map.remove(&k);
    }
    Ok(())
}

fn sync_lpm<K: aya::Pod + PartialEq>(
    map: &mut LpmTrie<MapData, K, u8>,
    wanted: Vec<Key<K>>,
    belongs: impl Fn(&K) -> bool,
    what: &str,
) -> Result<()> {
    for k in &wanted {
        map.insert(k, 1, 0).map_err(map_err(what))?;
    }
    let stale: Vec<Key<K>> = map
        .keys()
        .filter_map(|k| k.ok())
        .filter(|k| {
            let data = k.data();
            belongs(&data)
                && !wanted
                    .iter()
                    .any(|w| w.prefix_len() == k.prefix_len() && w.data() == data)
        })
        .collect();
    for k in stale {
        let _ = map.remove(&k);
    }
    Ok(())
}

/// The four CIDR tries.
struct Tries {
    excl4: LpmTrie<MapData, ScopedV4, u8>,
    excl6: LpmTrie<MapData, ScopedV6, u8>,
    incl4: LpmTrie<MapData, ScopedV4, u8>,
    incl6: LpmTrie<MapData, ScopedV6, u8>,
}

impl Tries {
    fn open(layout: &PinLayout) -> Result<Self> {
        Ok(Tries {
            excl4: typed(layout, names::EXCL4, Map::LpmTrie)?,
            excl6: typed(layout, names::EXCL6, Map::LpmTrie)?,
            incl4: typed(layout, names::INCL4, Map::LpmTrie)?,
            incl6: typed(layout, names::INCL6, Map::LpmTrie)?,
        })
    }
}

fn split(scope: u64, nets: &BTreeSet<IpNet>) -> (Vec<Key<ScopedV4>>, Vec<Key<ScopedV6>>) {
    let mut v4 = Vec::new();
    let mut v6 = Vec::new();
    for n in nets {
        match n {
            IpNet::V4(n) => v4.push(v4_key(scope, n)),
            IpNet::V6(n) => v6.push(v6_key(scope, n)),
        }
    }
    (v4, v6)
}

/// Writes (or rewrites in place) everything the programs need to know about a scope.
pub fn write_scope(layout: &PinLayout, scope: u64, path: &Path, s: &ScopeSettings) -> Result<()> {
    let be = scope.to_be_bytes();
    let mut ports: HashMap<MapData, ScopedValue, u8> = typed(layout, names::PORTS, Map::HashMap)?;
    let mut uids: HashMap<MapData, ScopedValue, u8> = typed(layout, names::UIDS, Map::HashMap)?;
    let mut tries = Tries::open(layout)?;
    let mut config: HashMap<MapData, u64, ScopeConfig> =
        typed(layout, names::CONFIG, Map::HashMap)?;
    let mut meta: HashMap<MapData, u64, ScopeMeta> = typed(layout, names::META, Map::HashMap)?;

    let want_ports: BTreeSet<u32> = s.exclude_ports.iter().map(|p| *p as u32).collect();
    sync_set(&mut ports, scope, &want_ports, "writing ICP_PORTS")?;
    sync_set(&mut uids, scope, &s.bypass_uids, "writing ICP_UIDS")?;
    let (ex4, ex6) = split(scope, &s.exclude_cidrs);
    let (in4, in6) = split(scope, &s.include_cidrs);
    sync_lpm(
        &mut tries.excl4,
        ex4,
        |d| d.scope == be,
        "writing ICP_EXCL4",
    )?;
    sync_lpm(
        &mut tries.excl6,
        ex6,
        |d| d.scope == be,
        "writing ICP_EXCL6",
    )?;
    sync_lpm(
        &mut tries.incl4,
        in4,
        |d| d.scope == be,
        "writing ICP_INCL4",
    )?;
    sync_lpm(
        &mut tries.incl6,
        in6,
        |d| d.scope == be,
        "writing ICP_INCL6",
    )?;

    let mut flags = 0;
    if s.includes_v4() {
        flags |= FLAG_INCLUDE4;
    }
    if s.includes_v6() {
        flags |= FLAG_INCLUDE6;
    }
    if s.on_proxy_down == ProxyDown::Open {
        flags |= FLAG_FAIL_OPEN;
    }
    if s.proxy_listener == ProxyListener::Marked {
        flags |= FLAG_PROXY_MARKED;
    }
    let cfg = ScopeConfig {
        proxy_port: s.proxy_port,
        _pad: 0,
        bypass_mark: s.bypass_mark,
        flags,
        _pad2: 0,
    };
    meta.insert(scope, scope_meta(path), 0)
        .map_err(map_err("writing ICP_META"))?;
    config
        .insert(scope, cfg, 0)
        .map_err(map_err("writing ICP_CONFIG"))?;
    Ok(())
}

/// Removes every entry that belongs to a scope, its counters included.
pub fn remove_scope(layout: &PinLayout, scope: u64) -> Result<()> {
    let be = scope.to_be_bytes();
    let mut config: HashMap<MapData, u64, ScopeConfig> =
        typed(layout, names::CONFIG, Map::HashMap)?;
    // The config goes first: without it the programs leave every connect alone.
    let _ = config.remove(&scope);
    let mut meta: HashMap<MapData, u64, ScopeMeta> = typed(layout, names::META, Map::HashMap)?;
    let _ = meta.remove(&scope);
    let mut ports: HashMap<MapData, ScopedValue, u8> = typed(layout, names::PORTS, Map::HashMap)?;
    sync_set(&mut ports, scope, &BTreeSet::new(), "ICP_PORTS")?;
    let mut uids: HashMap<MapData, ScopedValue, u8> = typed(layout, names::UIDS, Map::HashMap)?;
    sync_set(&mut uids, scope, &BTreeSet::new(), "ICP_UIDS")?;
    let mut tries = Tries::open(layout)?;
    sync_lpm(&mut tries.excl4, vec![], |d| d.scope == be, "ICP_EXCL4")?;
    sync_lpm(&mut tries.excl6, vec![], |d| d.scope == be, "ICP_EXCL6")?;
    sync_lpm(&mut tries.incl4, vec![], |d| d.scope == be, "ICP_INCL4")?;
    sync_lpm(&mut tries.incl6, vec![], |d| d.scope == be, "ICP_INCL6")?;
    let mut counters: PerCpuHashMap<MapData, CounterKey, u64> =
        typed(layout, names::COUNTERS, Map::PerCpuHashMap)?;
    let stale: Vec<CounterKey> = counters
        .keys()
        .filter_map(|k| k.ok())
        .filter(|k| k.scope == scope)
        .collect();
    for k in stale {
        let _ = counters.remove(&k);
    }
    if layout.map(names::IN_CONFIG).exists() {
        let mut in_config: HashMap<MapData, u64, InboundConfig> =
            typed(layout, names::IN_CONFIG, Map::HashMap)?;
        let _ = in_config.remove(&scope);
        let mut in_ports: HashMap<MapData, ScopedValue, u8> =
            typed(layout, names::IN_PORTS, Map::HashMap)?;
        let stale: Vec<ScopedValue> = in_ports
            .keys()
            .filter_map(|k| k.ok())
            .filter(|k| k.scope == scope)
            .collect();
        for k in stale {
            let _ = in_ports.remove(&k);
        }
        let mut socks: SockHash<MapData, SockKey> = typed(layout, names::IN_SOCKS, Map::SockHash)?;
        for family in [AF_INET, AF_INET6] {
            let _ = socks.remove(&SockKey {
                scope,
                family: family as u32,
                _pad: 0,
            });
        }
    }
    Ok(())
}

/// A scope as the maps describe it.
#[derive(Clone, Debug)]
pub struct StoredScope {
    pub id: u64,
    pub path: String,
    pub settings: ScopeSettings,
}

/// Every scope that has a config entry, with its settings read back from the maps.
pub fn read_scopes(layout: &PinLayout) -> Result<Vec<StoredScope>> {
    let config: HashMap<MapData, u64, ScopeConfig> = typed(layout, names::CONFIG, Map::HashMap)?;
    let meta: HashMap<MapData, u64, ScopeMeta> = typed(layout, names::META, Map::HashMap)?;
    let ports: HashMap<MapData, ScopedValue, u8> = typed(layout, names::PORTS, Map::HashMap)?;
    let uids: HashMap<MapData, ScopedValue, u8> = typed(layout, names::UIDS, Map::HashMap)?;
    let tries = Tries::open(layout)?;

    let mut scopes: BTreeMap<u64, StoredScope> = BTreeMap::new();
    for entry in config.iter() {
        let (id, cfg) = entry.map_err(map_err("reading ICP_CONFIG"))?;
        let path = meta_path(&meta, id);
        scopes.insert(
            id,
            StoredScope {
                id,
                path,
                settings: ScopeSettings {
                    proxy_port: cfg.proxy_port,
                    bypass_mark: cfg.bypass_mark,
                    bypass_uids: BTreeSet::new(),
                    exclude_ports: BTreeSet::new(),
                    exclude_cidrs: BTreeSet::new(),
                    include_cidrs: BTreeSet::new(),
                    on_proxy_down: if cfg.flags & FLAG_FAIL_OPEN != 0 {
                        ProxyDown::Open
                    } else {
                        ProxyDown::Closed
                    },
                    proxy_listener: if cfg.flags & FLAG_PROXY_MARKED != 0 {
                        ProxyListener::Marked
                    } else {
                        ProxyListener::Any
                    },
                },
            },
        );
    }
    for k in ports.keys().filter_map(|k| k.ok()) {
        if let Some(s) = scopes.get_mut(&k.scope) {
            s.settings.exclude_ports.insert(k.value as u16);
        }
    }
    for k in uids.keys().filter_map(|k| k.ok()) {
        if let Some(s) = scopes.get_mut(&k.scope) {
            s.settings.bypass_uids.insert(k.value);
        }
    }
    let v4 = |k: Key<ScopedV4>| {
        let d = k.data();
        let net = Ipv4Net::new(
            Ipv4Addr::from(d.addr),
            (k.prefix_len() - LPM_SCOPE_BITS) as u8,
        )
        .ok()?;
        Some((u64::from_be_bytes(d.scope), IpNet::V4(net)))
    };
    let v6 = |k: Key<ScopedV6>| {
        let d = k.data();
        let net = Ipv6Net::new(
            Ipv6Addr::from(d.addr),
            (k.prefix_len() - LPM_SCOPE_BITS) as u8,
        )
        .ok()?;
        Some((u64::from_be_bytes(d.scope), IpNet::V6(net)))
    };
    let excl = tries
        .excl4
        .keys()
        .filter_map(|k| k.ok().and_then(v4))
        .chain(tries.excl6.keys().filter_map(|k| k.ok().and_then(v6)));
    for (id, net) in excl {
        if let Some(s) = scopes.get_mut(&id) {
            s.settings.exclude_cidrs.insert(net);
        }
    }
    let incl = tries
        .incl4
        .keys()
        .filter_map(|k| k.ok().and_then(v4))
        .chain(tries.incl6.keys().filter_map(|k| k.ok().and_then(v6)));
    for (id, net) in incl {
        if let Some(s) = scopes.get_mut(&id) {
            s.settings.include_cidrs.insert(net);
        }
    }
    Ok(scopes.into_values().collect())
}

/// Counter totals (summed over CPUs) per scope; scope 0 holds what belongs to no scope.
pub fn read_counters(layout: &PinLayout) -> Result<BTreeMap<u64, BTreeMap<&'static str, u64>>> {
    let counters: PerCpuHashMap<MapData, CounterKey, u64> =
        typed(layout, names::COUNTERS, Map::PerCpuHashMap)?;
    let mut out: BTreeMap<u64, BTreeMap<&'static str, u64>> = BTreeMap::new();
    for entry in counters.iter() {
        let (k, values) = entry.map_err(map_err("reading ICP_COUNTERS"))?;
        let Some(c) = Counter::from_u32(k.counter) else {
            continue;
        };
        let total: u64 = values.iter().sum();
        *out.entry(k.scope).or_default().entry(c.name()).or_default() += total;
    }
    Ok(out)
}

/// Number of entries in `ICP_HANDOFF`, the one record map with a capacity (the others are
/// socket storage, freed with their sockets, which the kernel does not let user space count).
pub fn handoff_count(layout: &PinLayout) -> Result<usize> {
    let handoff: HashMap<MapData, interceptor_common::TupleKey, interceptor_common::OrigDst> =
        typed(layout, names::HANDOFF, Map::HashMap)?;
    Ok(handoff.keys().count())
}

/// Kernel forwarding: entries of `ICP_FWD_STATE` and sockets in `ICP_FWD` (both 0 when the
/// maps are not pinned, as in a pin dir made by an older build).
pub fn kernel_forward_count(layout: &PinLayout) -> Result<(usize, usize)> {
    if !layout.map(names::FWD_STATE).exists() {
        return Ok((0, 0));
    }
    let state: HashMap<MapData, u64, interceptor_common::FwdState> =
        typed(layout, names::FWD_STATE, Map::HashMap)?;
    let socks: aya::maps::SockHash<MapData, u64> = typed(layout, names::FWD, Map::SockHash)?;
    Ok((state.keys().count(), socks.keys().count()))
}

fn scope_meta(path: &Path) -> ScopeMeta {
    let mut m = ScopeMeta {
        path_len: 0,
        _pad: 0,
        path: [0; META_PATH_LEN],
    };
    let bytes = path.as_os_str().as_encoded_bytes();
    let n = bytes.len().min(META_PATH_LEN);
    m.path[..n].copy_from_slice(&bytes[..n]);
    m.path_len = n as u32;
    m
}

fn meta_path(meta: &HashMap<MapData, u64, ScopeMeta>, id: u64) -> String {
    meta.get(&id, 0)
        .ok()
        .map(|m| {
            String::from_utf8_lossy(&m.path[..(m.path_len as usize).min(META_PATH_LEN)])
                .into_owned()
        })
        .unwrap_or_default()
}

/// Writes (or rewrites in place) an inbound scope's settings.
pub fn write_inbound_scope(
    layout: &PinLayout,
    scope: u64,
    path: &Path,
    s: &InboundSettings,
) -> Result<()> {
    let mut ports: HashMap<MapData, ScopedValue, u8> =
        typed(layout, names::IN_PORTS, Map::HashMap)?;
    let mut config: HashMap<MapData, u64, InboundConfig> =
        typed(layout, names::IN_CONFIG, Map::HashMap)?;
    let mut meta: HashMap<MapData, u64, ScopeMeta> = typed(layout, names::META, Map::HashMap)?;
    let wanted: BTreeMap<u32, u8> = s
        .exclude_ports
        .iter()
        .map(|p| (*p as u32, IN_PORT_EXCLUDED))
        .chain(
            s.include_ports
                .iter()
                .map(|p| (*p as u32, IN_PORT_INCLUDED)),
        )
        .collect();
    for (port, kind) in &wanted {
        ports
            .insert(scoped(scope, *port), kind, 0)
            .map_err(map_err("writing ICP_IN_PORTS"))?;
    }
    let stale: Vec<ScopedValue> = ports
        .keys()
        .filter_map(|k| k.ok())
        .filter(|k| k.scope == scope && !wanted.contains_key(&k.value))
        .collect();
    let mut flags = 0;
    if !s.include_ports.is_empty() {
        flags |= FLAG_INCLUDE_PORTS;
    }
    if s.on_proxy_down == ProxyDown::Open {
        flags |= FLAG_FAIL_OPEN;
    }
    let cfg = InboundConfig {
        inbound_port: s.inbound_port,
        _pad: 0,
        flags,
    };
    meta.insert(scope, scope_meta(path), 0)
        .map_err(map_err("writing ICP_META"))?;
    config
        .insert(scope, cfg, 0)
        .map_err(map_err("writing ICP_IN_CONFIG"))?;
    for k in stale {
        let _ = ports.remove(&k);
    }
    Ok(())
}

/// An inbound scope as the maps describe it.
#[derive(Clone, Debug)]
pub struct StoredInbound {
    pub id: u64,
    pub path: String,
    pub settings: InboundSettings,
    /// Families (`AF_INET`, `AF_INET6`) with a registered inbound listener.
    pub registered: Vec<u16>,
}

/// Every inbound scope, with its settings read back from the maps.
pub fn read_inbound_scopes(layout: &PinLayout) -> Result<Vec<StoredInbound>> {
    if !layout.map(names::IN_CONFIG).exists() {
        return Ok(Vec::new());
    }
    let config: HashMap<MapData, u64, InboundConfig> =
        typed(layout, names::IN_CONFIG, Map::HashMap)?;
    let meta: HashMap<MapData, u64, ScopeMeta> = typed(layout, names::META, Map::HashMap)?;
    let ports: HashMap<MapData, ScopedValue, u8> = typed(layout, names::IN_PORTS, Map::HashMap)?;
    let socks: SockHash<MapData, SockKey> = typed(layout, names::IN_SOCKS, Map::SockHash)?;
    let mut out: BTreeMap<u64, StoredInbound> = BTreeMap::new();
    for entry in config.iter() {
        let (id, cfg) = entry.map_err(map_err("reading ICP_IN_CONFIG"))?;
        out.insert(
            id,
            StoredInbound {
                id,
                path: meta_path(&meta, id),
                settings: InboundSettings {
                    inbound_port: cfg.inbound_port,
                    exclude_ports: BTreeSet::new(),
                    include_ports: BTreeSet::new(),
                    on_proxy_down: if cfg.flags & FLAG_FAIL_OPEN != 0 {
                        ProxyDown::Open
                    } else {
                        ProxyDown::Closed
                    },
                },
                registered: Vec::new(),
            },
        );
    }
    for entry in ports.iter() {
        let Ok((k, kind)) = entry else { continue };
        if let Some(s) = out.get_mut(&k.scope) {
            let set = if kind == IN_PORT_INCLUDED {
                &mut s.settings.include_ports
            } else {
                &mut s.settings.exclude_ports
            };
            set.insert(k.value as u16);
        }
    }
    for k in socks.keys().filter_map(|k| k.ok()) {
        if let Some(s) = out.get_mut(&k.scope) {
            s.registered.push(k.family as u16);
            s.registered.sort_unstable();
        }
    }
    Ok(out.into_values().collect())
}

/// Puts the proxy's inbound listener of `family` for `scope` into `ICP_IN_SOCKS`, replacing
/// any earlier one.
pub fn register_listener(
    layout: &PinLayout,
    scope: u64,
    family: u16,
    sock: &impl std::os::fd::AsRawFd,
) -> Result<()> {
    let mut socks: SockHash<MapData, SockKey> = typed(layout, names::IN_SOCKS, Map::SockHash)?;
    let key = SockKey {
        scope,
        family: family as u32,
        _pad: 0,
    };
    socks
        .insert(key, sock.as_raw_fd(), 0)
        .map_err(map_err("writing ICP_IN_SOCKS"))
}
