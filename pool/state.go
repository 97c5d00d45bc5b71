package pool

import (
	"fmt"
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

// setState is the one place an instance changes state. It refuses a
// transition the diagram does not allow, accounts the time spent in the old
// state, and queues the record for the store. The caller holds m.mu.
func (m *Manager) setState(in *Instance, to State, reason string) error {
	if in.State == to {
		return nil
	}
	ok := false
	for _, s := range transitions[in.State] {
		if s == to {
			ok = true
			break
		}
	}
	if !ok {
		return fmt.Errorf("instance %s: no transition from %s to %s", in.name(), in.State, to)
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
	return nil
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
