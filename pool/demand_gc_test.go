package pool

import (
	"testing"
	"time"

	"github.com/hangar-ci/hangar/pool/store"
)

// A removed pool's demand history is deleted at the next start; a pool
// still configured keeps its own, auto or not.
func TestRemovedPoolsHistoryDeleted(t *testing.T) {
	h := newHarness(t, nil)
	h.shutdown()
	s, err := store.Open(h.path)
	if err != nil {
		t.Fatal(err)
	}
	for _, name := range []string{"gone", "demo"} {
		if err := s.CommitWait(store.Op{Kind: store.Demand, ID: name, Value: newDemand(h.clock.Now().Add(-time.Hour))}); err != nil {
			t.Fatal(err)
		}
	}
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
	h.open()
	left, err := store.Load[*demand](h.store, store.Demand)
	if err != nil {
		t.Fatal(err)
	}
	if _, ok := left["gone"]; ok {
		t.Error("the history of a pool no longer configured is still stored")
	}
	if _, ok := left["demo"]; !ok {
		t.Error("the history of a configured pool was deleted")
	}
}
