package pool

import (
	"fmt"
	"slices"
	"time"
)

// State is an instance's place in its pool's life cycle. The pool owns every
// transition; providers only report cloud status (cloud.State).
//
//	launching → booting → idle ⇄ leased → releasing → idle
//	    │          │        │       │          │
//	    └──────────┴────────┴───────┴──────────┴──→ terminating → gone
//	                        │       └→ draining ──┘
//	                        idle → stopping → stopped → starting → booting
//	booting --boot_timeout--> failed → terminating
//
// releasing is not in DESIGN.md: after a release with reuse, the instance is
// not idle until its worker has stopped and it has said so (its next
// assignment poll with no current lease). Handing it out before then could
// give a new lease a machine still running the last build.
type State string

const (
	Launching   State = "launching"   // intent on disk, launch call under way
	Booting     State = "booting"     // the cloud runs it; waiting for its ready report
	Idle        State = "idle"        // ready, no lease
	Leased      State = "leased"      // its worker runs for a lease
	Releasing   State = "releasing"   // lease ended; waiting for the worker to stop
	Draining    State = "draining"    // leased, to be terminated when the lease ends
	Stopping    State = "stopping"    // stop call under way
	Stopped     State = "stopped"     // stopped with its disk kept
	Starting    State = "starting"    // start call under way
	Failed      State = "failed"      // did not boot in time, or broke
	Terminating State = "terminating" // terminate call under way (retried until done)
	Gone        State = "gone"        // terminated; the record is kept a while for the API
)

var transitions = map[State][]State{
	Launching:   {Booting, Idle, Gone, Terminating},
	Booting:     {Idle, Failed, Terminating},
	Idle:        {Leased, Stopping, Terminating},
	Leased:      {Releasing, Draining, Terminating},
	Releasing:   {Idle, Terminating},
	Draining:    {Terminating},
	Stopping:    {Stopped, Terminating},
	Stopped:     {Starting, Terminating},
	Starting:    {Booting, Stopped, Terminating},
	Failed:      {Terminating},
	Terminating: {Gone},
	Gone:        {},
}

// live reports whether an instance in s counts against max_instances.
func (s State) live() bool { return s != Gone }

// setState is the one place an instance changes state. It accounts the
// time spent in the old state and queues the record for the store. A
// transition the diagram does not allow is a bug: it is refused and made
// loud (see illegal). The caller holds m.mu.
func (m *Manager) setState(in *Instance, to State, reason string) {
	if in.State == to {
		return
	}
	if !slices.Contains(transitions[in.State], to) {
		m.illegal("instance", in.name(), string(in.State), string(to))
		return
	}
	now := m.clock.Now()
	m.account(in, now)
	m.log.Info("instance state", "pool", in.Pool, "instance", in.name(), "from", in.State, "to", to, "reason", reason)
	in.State = to
	in.Since = now
	if reason != "" {
		in.Reason = reason
	}
	m.saveInstance(in)
	m.notify()
}

// illegal reports a refused transition of a state machine: at error in the
// log, in hangar_illegal_transitions_total, and, under go test, as a panic,
// so that no test passes over one.
func (m *Manager) illegal(machine, id, from, to string) {
	m.log.Error("illegal state transition refused", "machine", machine, "id", id, "from", from, "to", to)
	if m.metrics != nil {
		m.metrics.IllegalTransitions.WithLabelValues(machine).Inc()
	}
	if m.panicOnIllegal {
		panic(fmt.Sprintf("illegal %s state transition of %s: %s → %s", machine, id, from, to))
	}
}

// account adds the time since the last accounting to the instance-seconds
// counter of its current state.
func (m *Manager) account(in *Instance, now time.Time) {
	if m.metrics == nil || in.accounted.IsZero() {
		in.accounted = now
		return
	}
	// A gone instance costs nothing: its record is only kept for the API.
	if d := now.Sub(in.accounted); d > 0 && in.State != Gone {
		m.metrics.InstanceSeconds.WithLabelValues(in.Pool, string(in.State)).Add(d.Seconds())
	}
	in.accounted = now
}
