package pool

import (
	"time"
)

// MaxEvents is how many pool events the manager remembers: enough for an
// operator to see what just happened, in memory only, gone at a restart.
const MaxEvents = 100

// EventKind says what happened.
type EventKind string

const (
	EventState       EventKind = "state"        // an instance changed state (setState)
	EventLaunchError EventKind = "launch_error" // a pool could not launch (or bring its image or cache)
	EventReap        EventKind = "reap"         // an instance was taken out of service, for Reason
)

// Event is one thing that happened in a pool, as `GET /v1/events` shows
// it. It carries no secret: no token, password, user-data or lease id, so
// that whoever may list instances may see it.
type Event struct {
	Time     time.Time `json:"time"`
	Pool     string    `json:"pool"`
	Kind     EventKind `json:"kind"`
	Instance string    `json:"instance,omitempty"`
	From     State     `json:"from,omitempty"`
	To       State     `json:"to,omitempty"`
	Reason   Reason    `json:"reason,omitempty"`
	Message  string    `json:"message,omitempty"`
}

// eventRing keeps the last MaxEvents events, overwriting the oldest.
type eventRing struct {
	buf  [MaxEvents]Event
	next int // where the next event goes
	n    int // how many are kept, up to MaxEvents
}

func (r *eventRing) add(e Event) {
	r.buf[r.next] = e
	r.next = (r.next + 1) % MaxEvents
	r.n = min(r.n+1, MaxEvents)
}

// list returns the events of pool ("" for all), oldest first.
func (r *eventRing) list(pool string) []Event {
	out := []Event{}
	for i := range r.n {
		e := r.buf[(r.next-r.n+i+MaxEvents)%MaxEvents]
		if pool == "" || e.Pool == pool {
			out = append(out, e)
		}
	}
	return out
}

// event records e at the manager's time. Caller holds m.mu.
func (m *Manager) event(e Event) {
	e.Time = m.clock.Now()
	m.events.add(e)
	if sim := m.opts.Simulation; sim != nil && sim.Observe != nil {
		sim.Observe(e)
	}
}

// stateEvent records an instance's transition. Caller holds m.mu.
func (m *Manager) stateEvent(in *Instance, from, to State, reason Reason) {
	m.event(Event{Pool: in.Pool, Kind: EventState, Instance: in.name(), From: from, To: to, Reason: reason})
}

// reapEvent records an instance taken out of service, once it is in the
// state that ends it. Caller holds m.mu.
func (m *Manager) reapEvent(in *Instance, reason Reason) {
	m.event(Event{Pool: in.Pool, Kind: EventReap, Instance: in.name(), To: in.State, Reason: reason,
		Message: "taken out of service: " + string(reason)})
}

// launchErrorEvent records why pool could not launch; msg is what `hangar
// pools` shows as its launch error. Caller holds m.mu.
func (m *Manager) launchErrorEvent(pool, instance, msg string) {
	m.event(Event{Pool: pool, Kind: EventLaunchError, Instance: instance, Message: msg})
}

// Events lists the last MaxEvents events of pool ("" for all), oldest
// first. Everyone who may list instances may list them: an event names
// instances and pools, never a lease.
func (m *Manager) Events(pool string) ([]Event, error) {
	m.mu.Lock()
	defer m.unlock()
	if _, ok := m.pools[pool]; pool != "" && !ok {
		return nil, m.unknownPool(pool)
	}
	return m.events.list(pool), nil
}
