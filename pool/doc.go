// Package pool keeps pools of cloud instances and hands them out as leases.
//
// One Manager owns every pool. Every decision happens under its mutex
// (m.mu) and ends with m.unlock, which commits all the records the decision
// changed to the store as one transaction; anything told to a client waits
// until its records are on disk. Cloud calls run outside the lock in
// goroutines that take it again to record their results; the call under way
// for an instance is its Op. All time comes from one Clock.
//
// # Instances
//
// setState is the one place an instance changes state; the table is
// transitions in state.go.
//
//	launching ──→ booting ──→ idle ──→ leased ──→ releasing ──→ idle
//	                           │         └──→ draining
//	                           └──→ stopping ──→ stopped ──→ starting ──→ booting
//	                                                 ↑__________________│ (a restart cut its start)
//
//	idle, leased, releasing, draining ──→ saving ──→ terminating
//	                (a pool with a cache: an instance that served a lease
//	                 ends once its cache volume is snapshotted; cache.go)
//
//	every state above ──→ terminating ──→ gone
//	launching ──→ gone (its launch failed, or never began)
//
// releasing is not in the first design notes (docs/design.md): after a release with reuse, the instance
// is not idle until its worker has stopped and it has said so (its next
// assignment poll with no current lease). Handing it out before then could
// give a new lease a machine still running the last build. An instance that
// does not boot in time goes straight to terminating (reason boot_timeout);
// older versions passed through a "failed" state, which restore reads as
// terminating.
//
// # Leases
//
// setLeaseState is the one place a lease changes state; the table is
// leaseTransitions in lease.go.
//
//	pending ──assigned──→ active ──released──→ released
//	   │                    ├──ttl ran out───→ expired
//	   │                    └──instance lost─→ lost
//	   └──given up──→ canceled
//
// An active lease whose holder never heard of it (Lease.Unclaimed) ends
// released after the pool's claim_timeout.
//
// A transition that is not in a table is a bug: setState and setLeaseState
// refuse it, log it at error, count it in hangar_illegal_transitions_total,
// and panic under go test.
package pool
