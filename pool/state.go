package pool

import (
	"fmt"
	"slices"
	"time"
)

// State is an instance's place in its pool's life cycle; the diagram is in
// the package doc. The pool owns every transition; providers only report
// cloud status (cloud.State).
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
	Saving      State = "saving"      // ending: its cache volume is being snapshotted first (cache.go)
	Terminating State = "terminating" // terminate call under way (retried until done)
	Gone        State = "gone"        // terminated; the record is kept a while for the API
)

var transitions = map[State][]State{
	Launching:   {Booting, Idle, Gone, Terminating},
	Booting:     {Idle, Terminating},
	Idle:        {Leased, Stopping, Saving, Terminating},
	Leased:      {Releasing, Draining, Saving, Terminating},
	Releasing:   {Idle, Saving, Terminating},
	Draining:    {Saving, Terminating},
	Saving:      {Terminating},
	Stopping:    {Stopped, Terminating},
	Stopped:     {Starting, Terminating},
	Starting:    {Booting, Stopped, Terminating},
	Terminating: {Gone},
	Gone:        {},
}

// live reports whether an instance in s counts against max_instances.
func (s State) live() bool { return s != Gone }

// setState is the one place an instance changes state. It accounts the
// time spent in the old state and queues the record for the store. A
// transition the diagram does not allow is a bug: it is refused and made
// loud (see illegal). The caller holds m.mu.
func (m *Manager) setState(in *Instance, to State, reason Reason) {
	if in.State == to {
		return
	}
	if !slices.Contains(transitions[in.State], to) {
		m.illegal("instance", in.name(), string(in.State), string(to))
		return
	}
	if in.refresh != nil && in.op != OpSnapshot {
		// Asked for a snapshot while idle, and no longer idle: the
		// snapshot's own end is the call's to record.
		m.endRefreshLocked(in, fmt.Errorf("instance %s became %s before its cache was flushed", in.name(), to))
	}
	now := m.clock.Now()
	m.account(in, now)
	m.log.Info("instance state", "pool", in.Pool, "instance", in.name(), "from", in.State, "to", to, "reason", reason)
	m.stateEvent(in, in.State, to, reason)
	if p := m.pools[in.Pool]; p != nil {
		p.count[in.State]--
		p.count[to]++
		delete(p.idle, in.Key)
		if to == Idle {
			p.idle[in.Key] = in
		}
	}
	in.State = to
	in.Since = now
	if reason != "" {
		in.Reason = reason
	}
	if to == Idle && reason == ReasonReady {
		m.bootObservedLocked(in)
	}
	m.saveInstance(in)
	m.wakeInstance(in)
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

// Op is the cloud call under way for an instance. At most one runs at a
// time; the call's goroutine sets it back to OpNone when it has recorded
// the result. In memory only: a restart resumes what the states say.
type Op string

const (
	OpNone      Op = ""
	OpLaunch    Op = "launch"
	OpStart     Op = "start"
	OpStop      Op = "stop"
	OpTerminate Op = "terminate"
	OpCache     Op = "cache"    // its cache volume being created and attached
	OpSnapshot  Op = "snapshot" // its cache volume being snapshotted
)

// Reason says why an instance entered its state; `hangar instances` shows
// it and hangar_reaped_instances_total counts ends by it.
type Reason string

const (
	ReasonNone             Reason = ""
	ReasonLaunched         Reason = "launched"
	ReasonLaunchFailed     Reason = "launch_failed"
	ReasonLaunchShort      Reason = "launch_short" // a batch's slot the cloud started no instance for (a partial batch)
	ReasonAdopted          Reason = "adopted"
	ReasonReady            Reason = "ready"
	ReasonLeased           Reason = "leased"
	ReasonReleased         Reason = "released"
	ReasonWorkerStopped    Reason = "worker_stopped"
	ReasonNeeded           Reason = "needed" // a stopped instance started for a lease or min_idle
	ReasonStarted          Reason = "started"
	ReasonDrain            Reason = "drain"
	ReasonDiscard          Reason = "discard"
	ReasonLeaseExpired     Reason = "lease_expired"
	ReasonMaxUses          Reason = "max_uses"
	ReasonPoolRemoved      Reason = "pool_removed"
	ReasonBootTimeout      Reason = "boot_timeout"
	ReasonReleaseTimeout   Reason = "release_timeout"
	ReasonScaleIn          Reason = "scale_in"
	ReasonIdleTTD          Reason = "idle_ttd"
	ReasonStartFailed      Reason = "start_failed"
	ReasonStopFailed       Reason = "stop_failed"
	ReasonInterruptedStop  Reason = "interrupted_stop"
	ReasonInterruptedStart Reason = "interrupted_start"
	ReasonVanished         Reason = "vanished"
	ReasonStoppedOutside   Reason = "stopped_outside_hangar"
	ReasonOrphan           Reason = "orphan"
	ReasonRetry            Reason = "retry" // a gone instance the cloud still runs
	ReasonStuckTerminating Reason = "stuck_terminating"
	ReasonRepaired         Reason = "repaired" // restore mended its record
	ReasonLeaseUnknown     Reason = "lease_unknown"
	ReasonCacheFailed      Reason = "cache_failed"  // its cache volume could not be made or attached
	ReasonCacheSaved       Reason = "cache_saved"   // its cache is snapshotted; now it ends
	ReasonCacheTimeout     Reason = "cache_timeout" // it never said its cache was flushed
	ReasonImageRolled      Reason = "image_rolled"  // idle on an older image when a new one was baked (--roll)
)
