//! Hot upgrade: a new process takes over the listening sockets of the running one.
//!
//! A proxy started with `--upgrade-socket PATH` serves upgrades on that Unix socket
//! (mode 0600). A new proxy started with the same `--upgrade-socket PATH --upgrade`:
//!
//! 1. connects and says `hello`; each side checks the other's credentials (SO_PEERCRED:
//!    the same user, or root). The running proxy serves one upgrade at a time: a second
//!    one meanwhile is refused;
//! 2. receives every listening socket over SCM_RIGHTS, each under a stable listener id
//!    (`outbound.0`, `inbound.1`, `admin`, `upgrade`: the role and the position in the
//!    configuration, never the address), plus the counters so far;
//! 3. binds what it does not inherit, wraps everything, starts accepting (both processes
//!    now accept from the same kernel queues), and says `ready`;
//! 4. the old process stops accepting and closes its copies (close, never `shutdown`,
//!    which would break the shared socket), answers `released` with its counters;
//! 5. it moves its established opaque TCP connections (outbound and inbound, routed TCP
//!    and TLS passthrough too): each forwarder, asked to, stops reading at a point where it
//!    holds none of its connection's bytes (what it read is written first) and offers
//!    its two sockets (taken out of its event loop, not closed) with its state (original destination, direction, peer, byte
//!    counts, age, which side has sent its FIN) on a channel; batches of up to
//!    [`MOVE_BATCH`] go in a `connections` message, two descriptors each. The new process
//!    registers them, answers `taken`, and only then copies; the old one closes its
//!    descriptors only after `taken` (never `shutdown`, never a reset). A connection still connecting
//!    upstream moves once connected. If the conversation breaks before `taken` (the new
//!    process died), nothing more is offered and every offered connection gets its sockets
//!    back and carries on in the old process;
//! 6. it drains what could not move until it holds nothing: routed HTTP connections end
//!    between requests (hyper's graceful shutdown at the drain's start: an idle one is
//!    closed, the HTTP/1 response in flight says `Connection: close`, HTTP/2 gets GOAWAY and
//!    its streams in flight finish), as does anything else (a direction whose peer does not
//!    read) or until `--drain-timeout`, which cuts the rest
//!    (counted in `drain_cut_connections` and logged), sends `exited` with its final counters and per-destination
//!    series and exits. The new process adds each report to its own counters, so totals
//!    continue across upgrades; a moved connection's duration and per-destination bytes
//!    are counted where it closes.
//!
//! If the new process fails before `ready` (a bad setting, a crash, a kill), the old one
//! sees the connection close and keeps serving as if nothing happened: it never stopped.
//! The new process serves upgrades on the inherited Unix socket once it is the only one
//! accepting, so the next upgrade works the same way.
//!
//! Messages are JSON lines over a stream socket; file descriptors travel with the first
//! byte of the `listeners` line.
//!
//! | file | what |
//! |---|---|
//! | `wire.rs` | the messages, their encoding, SCM_RIGHTS framing, the listener ids |
//! | `control.rs` | the Unix socket upgrades are served on, and who may connect to it |
//! | `takeover.rs` | the new process's side: receive the listeners, say ready, follow the old process until it exits |
//! | `handover.rs` | the running process's side: offer the listeners, wait for ready, report while draining |
//! | `error.rs` | [`UpgradeError`] |

mod control;
mod error;
mod handover;
mod takeover;
mod wire;

pub use control::ControlSocket;
pub use error::UpgradeError;
pub use handover::{serve, MoveReport, Offer, Successor, MOVE_BATCH, READY_TIMEOUT};
pub use takeover::{take_over, Adopter, Inherited, Predecessor, Takeover, HANDOFF_TIMEOUT};
#[cfg(feature = "fuzzing")]
pub use wire::fuzz_receive;
pub use wire::{inbound_id, outbound_id, ADMIN_ID, CONTROL_ID};
