package pool

import (
	"maps"
	"slices"
	"time"

	"github.com/hangar-ci/hangar/pool/store"
)

// Batch is the intent of one launch call that starts several instances
// (Spec.LaunchBatch). Its slots are instance records, Launching until the
// call answers, written with the batch in one transaction before the call.
// Every instance of the batch boots with the same user-data, which holds
// the batch's enrollment token: at boot an instance presents it with its
// instance id, and gets its own bootstrap token (channel.go's Enroll).
type Batch struct {
	// Key is the launch's client token and its hangar:intent tag.
	Key   string `json:"key"`
	Pool  string `json:"pool"`
	Image string `json:"image,omitempty"` // what the call launches: a retry must send the same
	// Slots are the keys of its instances; a slot's index is the launch
	// index the cloud is expected to give its instance.
	Slots []string `json:"slots"`
	// TokenHash is the hash of the enrollment token; "" once the token is
	// dead (every slot enrolled or gone, or the deadline passed).
	TokenHash string `json:"token_hash,omitempty"`
	// EarlierTokenHashes are those of tokens of calls a restart cut off:
	// such a call may have reached the cloud, whose instances then boot
	// with the earlier token (as Instance.EarlierTokenHashes).
	EarlierTokenHashes []string  `json:"earlier_token_hashes,omitempty"`
	IntentAt           time.Time `json:"intent_at"`
	// Deadline is when the token dies whatever is left to enroll: the
	// launch's answer plus boot_timeout. Zero until the launch answered.
	Deadline time.Time `json:"deadline,omitzero"`
	// Launched is how many instances the cloud started for it; -1 until
	// the call answered (or reconcile adopted its instances).
	Launched int `json:"launched"`

	inFlight bool // its launch call is under way (or about to be)
}

// answered reports whether the cloud has named b's instances.
func (b *Batch) answered() bool { return b.Launched >= 0 }

func (m *Manager) saveBatch(b *Batch) {
	m.write(store.Op{Kind: store.Batches, ID: b.Key, Value: b})
}

// indexBatch makes b known, and its token valid while it lives.
func (m *Manager) indexBatch(b *Batch) {
	m.batches[b.Key] = b
	if b.TokenHash != "" {
		m.byBatchToken[b.TokenHash] = b
		for _, h := range b.EarlierTokenHashes {
			m.byBatchToken[h] = b
		}
	}
}

// killBatchToken ends b's enrollment token (every hash it had): no
// instance enrolls with it from now on. Caller holds m.mu.
func (m *Manager) killBatchToken(b *Batch, why string) {
	if b.TokenHash == "" {
		return
	}
	delete(m.byBatchToken, b.TokenHash)
	for _, h := range b.EarlierTokenHashes {
		delete(m.byBatchToken, h)
	}
	b.TokenHash, b.EarlierTokenHashes = "", nil
	m.saveBatch(b)
	m.log.Info("batch enrollment token dead", "pool", b.Pool, "batch", b.Key, "why", why)
}

// slot returns the instance of b's slot i, nil if there is none.
func (m *Manager) slot(b *Batch, i int) *Instance {
	if i < 0 || i >= len(b.Slots) {
		return nil
	}
	in := m.instances[b.Slots[i]]
	if in == nil || in.Batch != b.Key {
		return nil
	}
	return in
}

// slotDone reports whether in has nothing left to enroll: it enrolled, or
// it is gone (or its record is).
func slotDone(in *Instance) bool {
	return in == nil || !in.EnrolledAt.IsZero() || in.State == Gone || in.State == Terminating
}

// batchDone reports whether every slot of b has enrolled or gone, once the
// cloud has answered: its token has nothing left to do.
func (m *Manager) batchDone(b *Batch) bool {
	if !b.answered() || b.inFlight {
		return false
	}
	for i := range b.Slots {
		if !slotDone(m.slot(b, i)) {
			return false
		}
	}
	return true
}

// repairBatchesLocked checks the batch invariants over the restored
// records and mends what breaks them, as repairLocked does for leases:
//   - a slot names a batch that exists and lists it at its Slot;
//   - a batch's slots exist and name it;
//   - a batch whose call never answered has no deadline, and a live token
//     only while it may still enroll someone.
//
// Caller holds m.mu (or owns m alone, as New does).
func (m *Manager) repairBatchesLocked() {
	for _, in := range sortedInstances(m.instances) {
		if in.Batch == "" {
			continue
		}
		b := m.batches[in.Batch]
		if b != nil && in.Slot >= 0 && in.Slot < len(b.Slots) && b.Slots[in.Slot] == in.Key {
			continue
		}
		if in.State != Launching {
			// Launched and named already: it lives on its own record
			// (its batch only mattered for enrollment).
			continue
		}
		// An intent no batch launches: nothing may launch it, and
		// nothing does (reconcile ends any instance tagged with its
		// batch's key that no slot takes).
		m.repaired("batch_slot_orphaned", "launch intent names no batch that holds it; dropped", nil, in)
		m.setState(in, Gone, ReasonRepaired)
	}
	for _, key := range slices.Sorted(maps.Keys(m.batches)) {
		b := m.batches[key]
		for i, k := range b.Slots {
			if in := m.instances[k]; in == nil || in.Batch != b.Key || in.Slot != i {
				if in == nil && b.answered() {
					continue // forgotten after it was gone, as every gone record is
				}
				m.log.Warn("store repair: batch slot has no instance that names it; counted as gone", "kind", "batch_slot_missing", "batch", b.Key, "slot", i)
				if m.metrics != nil {
					m.metrics.StoreRepairs.WithLabelValues("batch_slot_missing").Inc()
				}
			}
		}
		if b.TokenHash != "" && m.batchDone(b) {
			m.killBatchToken(b, "every slot enrolled or gone")
		}
	}
}
