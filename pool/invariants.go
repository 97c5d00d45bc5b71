package pool

import (
	"maps"
	"slices"
	"strings"
)

// The records that bind a lease to its instance are written in one
// transaction (see Manager.unlock), but a store written by an older version,
// or one torn some other way, may break the bond. restore mends it before
// anything is handed out, so that one machine can never serve two builds.
//
// The invariants:
//   - an active lease's instance exists, names that lease and is leased or
//     draining;
//   - an instance names at most one lease, and only an active one that
//     names it back;
//   - an instance leased or draining names a lease.

// repairLocked checks the invariants over every record and mends what breaks
// them, logging and counting each repair. Caller holds m.mu (or owns m alone,
// as New does).
func (m *Manager) repairLocked() {
	for _, l := range sortedLeases(m.leases) {
		if l.State != LeaseActive {
			continue
		}
		in, ok := m.instances[l.InstanceKey]
		switch {
		case ok && in.LeaseID == l.ID && (in.State == Leased || in.State == Draining):
			continue
		case ok && in.LeaseID == "" && in.State == Idle:
			// The lease was written, the instance's half of the
			// assignment was not: finish it, as the client may have been
			// told the lease is theirs.
			in.LeaseID = l.ID
			in.Uses++
			m.repaired("lease_reattached", "active lease's instance was idle; assignment completed", l, in)
			m.setState(in, Leased, ReasonRepaired)
		case !ok:
			m.repaired("lease_instance_missing", "active lease's instance is unknown; lease ended as lost", l, nil)
			m.endLeaseLocked(l, LeaseLost, true)
		default:
			// Held by another lease, or in no state to serve one.
			m.repaired("lease_conflict", "active lease's instance does not hold it; lease ended as lost", l, in)
			m.endLeaseLocked(l, LeaseLost, true)
		}
	}
	for _, in := range sortedInstances(m.instances) {
		if in.LeaseID == "" {
			if in.State == Leased || in.State == Draining {
				m.repaired("instance_without_lease", "instance is leased but names no lease; terminating it", nil, in)
				m.terminateOnRestoreLocked(in, ReasonLeaseUnknown)
			}
			continue
		}
		l, ok := m.leases[in.LeaseID]
		if ok && l.State == LeaseActive && l.InstanceKey == in.Key {
			continue
		}
		m.repaired("instance_stale_lease", "instance names a lease that does not hold it", l, in)
		in.LeaseID = ""
		m.saveInstance(in)
		switch {
		case in.State == Leased && ok && l.State == LeaseReleased:
			// Its release was written, the instance's half was not.
			m.setState(in, Releasing, ReasonRepaired)
		case in.State == Leased || in.State == Draining:
			// Its holder's fate is unknown: so is the machine's state.
			m.terminateOnRestoreLocked(in, ReasonLeaseUnknown)
		}
	}
}

// terminateOnRestoreLocked marks in for termination; resumeLocked makes the
// cloud call when the manager runs.
func (m *Manager) terminateOnRestoreLocked(in *Instance, reason Reason) {
	m.revokeTokens(in)
	m.setState(in, Terminating, reason)
}

func (m *Manager) repaired(kind, what string, l *Lease, in *Instance) {
	args := []any{"kind", kind}
	if l != nil {
		args = append(args, "lease", l.ID, "lease_state", l.State)
	}
	if in != nil {
		args = append(args, "instance", in.name(), "instance_state", in.State)
	}
	m.log.Warn("store repair: "+what, args...)
	if m.metrics != nil {
		m.metrics.StoreRepairs.WithLabelValues(kind).Inc()
	}
}

// sortedLeases and sortedInstances give repairs a fixed order, so that the
// same torn store is always mended the same way.
func sortedLeases(all map[string]*Lease) []*Lease {
	out := slices.Collect(maps.Values(all))
	slices.SortFunc(out, func(a, b *Lease) int { return strings.Compare(a.ID, b.ID) })
	return out
}

func sortedInstances(all map[string]*Instance) []*Instance {
	out := slices.Collect(maps.Values(all))
	slices.SortFunc(out, func(a, b *Instance) int { return strings.Compare(a.Key, b.Key) })
	return out
}
