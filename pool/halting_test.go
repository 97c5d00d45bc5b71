package pool

import (
	"errors"
	"testing"
	"time"

	"github.com/hangar-ci/hangar/cloud"
)

// TestStuckTerminatingIsTerminatedAgain: an instance the cloud has called
// terminating for longer than haltingGrace gets its terminate re-issued
// (a crash cut the first one off; the local cloud finishes only when asked
// again). Before, reconcile took terminating for gone and never asked.
func TestStuckTerminatingIsTerminatedAgain(t *testing.T) {
	h := newHarness(t, nil)
	known := h.warm(1)[0]
	h.cloud.SetState(known, cloud.StateTerminating)
	orphan := h.cloud.Add(map[string]string{cloud.TagOwner: h.store.Owner(), cloud.TagPool: "demo", cloud.TagIntent: "h-unknown"}, cloud.StateTerminating)
	terminates := func(id string) int {
		n := 0
		for _, c := range h.cloud.Calls("terminate") {
			for _, x := range c.IDs {
				if x == id {
					n++
				}
			}
		}
		return n
	}
	h.reconcile() // the pool's record ends: it calls terminate, which does not finish
	h.cloud.SetState(known, cloud.StateTerminating)
	before := terminates(known)
	h.clock.Advance(haltingGrace)
	h.reconcile()
	if terminates(known) != before || terminates(orphan) != 0 {
		t.Fatal("terminated again within haltingGrace")
	}
	h.clock.Advance(time.Second)
	h.reconcile()
	if terminates(known) != before+1 || terminates(orphan) != 1 {
		t.Fatalf("past haltingGrace: terminates of the pool's instance %d (was %d), of the unknown one %d; want one more each",
			terminates(known), before, terminates(orphan))
	}
	// Once gone, nothing more; and the memory of it is dropped.
	h.cloud.SetState(known, cloud.StateTerminated)
	h.cloud.Remove(orphan)
	h.clock.Advance(time.Hour)
	h.reconcile()
	if terminates(known) != before+1 {
		t.Fatal("a terminated instance was terminated again")
	}
	h.m.mu.Lock()
	left := len(h.m.halting)
	h.m.unlock()
	if left != 0 {
		t.Fatalf("%d terminating instances still remembered after they went", left)
	}
}

// TestOrphanForgottenWhenItVanishes: an orphan that goes away by itself
// within orphan_grace is not remembered forever.
func TestOrphanForgottenWhenItVanishes(t *testing.T) {
	h := newHarness(t, nil)
	id := h.cloud.Add(map[string]string{cloud.TagOwner: h.store.Owner(), cloud.TagPool: "demo", cloud.TagIntent: "h-unknown"}, cloud.StateRunning)
	h.reconcile()
	h.cloud.Remove(id)
	h.reconcile()
	h.m.mu.Lock()
	left := len(h.m.orphans)
	h.m.unlock()
	if left != 0 {
		t.Fatalf("%d orphans remembered after the only one vanished", left)
	}
}

// TestTerminatingUntilTheCloudSaysTerminated: an instance whose terminate a
// crash cut short, which the cloud still calls terminating, stays
// terminating (and counts against max_instances) until the cloud says
// terminated; reconcile terminates it again meanwhile. It used to be taken
// for gone at once, and replaced while it still ran.
func TestTerminatingUntilTheCloudSaysTerminated(t *testing.T) {
	h := newHarness(t, func(p *Spec) { p.MaxInstances = 1 })
	id := h.warm(1)[0]
	h.cloud.FailNext("terminate", errors.New("cut off"))
	h.m.mu.Lock()
	h.m.terminateLocked(h.m.byID[id], ReasonDrain)
	h.m.unlock()
	h.settle()
	h.cloud.SetState(id, cloud.StateTerminating)
	h.restart()
	calls := h.cloud.Count("terminate")
	h.cloud.FailNext("terminate", errors.New("still shutting down"))
	h.reconcile()
	if st := h.state(id); st != Terminating {
		t.Fatalf("instance the cloud calls terminating is %s, want terminating", st)
	}
	if h.cloud.Count("terminate") != calls+1 {
		t.Fatal("reconcile did not terminate it again")
	}
	launches := h.cloud.Count("launch")
	v := h.lease(LeaseRequest{})
	h.settle()
	if v.State != LeasePending || h.cloud.Count("launch") != launches {
		t.Fatalf("lease %s, %d launches, with the only slot still terminating: max_instances overshot", v.State, h.cloud.Count("launch")-launches)
	}
	h.reconcile() // this time the terminate goes through
	if st := h.state(id); st != Gone {
		t.Fatalf("instance the cloud calls terminated is %s, want gone", st)
	}
}
