package pool

import (
	"context"
	"testing"

	"github.com/hangar-ci/hangar/cloud"
)

// TestTerminatedWhileLaunching: an instance whose end is decided while its
// launch call is under way is terminating at once (on disk, so a restart
// cannot forget it) and ends when the call returns with its cloud id. It
// used to be an in-memory "doomed" flag on a launching record.
func TestTerminatedWhileLaunching(t *testing.T) {
	for _, restart := range []bool{false, true} {
		name := "launch returns"
		if restart {
			name = "server restarts before the launch returns"
		}
		t.Run(name, func(t *testing.T) {
			h := newHarness(t, nil)
			entered, proceed := make(chan struct{}), make(chan struct{})
			h.cloud.SetAfterLaunch(func(ctx context.Context, spec cloud.LaunchSpec) error {
				close(entered)
				select {
				case <-proceed:
					return nil
				case <-ctx.Done():
					return ctx.Err()
				}
			})
			one := 1
			if _, err := h.m.Scale(context.Background(), "demo", &one, nil); err != nil {
				t.Fatal(err)
			}
			<-entered
			id := h.cloud.Running()[0]
			h.m.mu.Lock()
			var in *Instance
			for _, x := range h.m.instances {
				in = x
			}
			if in.op != OpLaunch {
				t.Fatalf("op under way: %q, want launch", in.op)
			}
			h.m.terminateLocked(in, "drain")
			state := in.State
			h.m.unlock()
			if state != Terminating {
				t.Fatalf("instance is %s while its launch is under way, want terminating", state)
			}
			zero := 0
			if _, err := h.m.Scale(context.Background(), "demo", &zero, nil); err != nil {
				t.Fatal(err)
			}
			h.cloud.SetAfterLaunch(nil)
			if restart {
				// The launch call is cut off by the shutdown; the
				// instance exists in the cloud, unknown by id.
				h.shutdown()
				close(proceed)
				h.open()
				h.reconcile()
			} else {
				close(proceed)
				h.settle()
			}
			if !h.cloud.Terminated(id) {
				t.Fatalf("instance %s was not terminated", id)
			}
			h.reconcile()
			if got := h.state(id); got != Gone {
				t.Fatalf("instance %s is %s, want gone", id, got)
			}
		})
	}
}
