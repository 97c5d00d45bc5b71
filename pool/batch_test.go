package pool

import (
	"testing"
	"time"

	"github.com/hangar-ci/hangar/pool/store"
)

// writeRecords puts records into the harness's store while no Manager has
// it open, as a torn write or an older version would have left them.
func (h *harness) writeRecords(ops ...store.Op) {
	h.t.Helper()
	h.shutdown()
	s, err := store.Open(h.path)
	if err != nil {
		h.t.Fatal(err)
	}
	if err := s.CommitWait(ops...); err != nil {
		h.t.Fatal(err)
	}
	if err := s.Close(); err != nil {
		h.t.Fatal(err)
	}
	h.open()
}

// Restore mends batch records that break the invariants: an intent whose
// batch is missing is dropped rather than launched, a dead batch's token
// stays dead, and a batch whose every slot is gone loses its token.
func TestBatchRestoreRepairs(t *testing.T) {
	h := newHarness(t, func(s *Spec) { s.LaunchBatch = 5 })
	now := h.clock.Now()
	lost := &Instance{Key: "h-lost", Pool: "demo", State: Launching, Since: now, IntentAt: now, Batch: "b-missing", Slot: 0}
	ended := &Instance{Key: "h-ended", Pool: "demo", State: Gone, Since: now, IntentAt: now, Batch: "b-done", Slot: 0}
	done := &Batch{Key: "b-done", Pool: "demo", Slots: []string{"h-ended"}, TokenHash: "live-hash", IntentAt: now, Deadline: now.Add(time.Hour), Launched: 1}
	h.writeRecords(
		store.Op{Kind: store.Instances, ID: lost.Key, Value: lost},
		store.Op{Kind: store.Instances, ID: ended.Key, Value: ended},
		store.Op{Kind: store.Batches, ID: done.Key, Value: done},
	)
	h.m.mu.Lock()
	gotLost, gotDone := *h.m.instances["h-lost"], *h.m.batches["b-done"]
	_, live := h.m.byBatchToken["live-hash"]
	h.m.unlock()
	if gotLost.State != Gone || gotLost.Reason != ReasonRepaired {
		t.Errorf("intent of a missing batch: %s (%s), want gone (repaired)", gotLost.State, gotLost.Reason)
	}
	if gotDone.TokenHash != "" || live {
		t.Errorf("batch with every slot gone: token hash %q, live %v; want dead", gotDone.TokenHash, live)
	}
	h.restart()
	h.settle()
	if n := h.cloud.Count("launch"); n != 0 {
		t.Errorf("%d launch calls after the repairs, want 0", n)
	}
	h.m.mu.Lock()
	defer h.m.unlock()
	if b := h.m.batches["b-done"]; b == nil || b.TokenHash != "" {
		t.Errorf("after a restart the repaired batch is %+v, want its token still dead", b)
	}
}
