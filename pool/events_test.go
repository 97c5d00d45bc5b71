package pool

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/hangar-ci/hangar/cloud"
)

// The ring keeps the newest MaxEvents, oldest first, and filters by pool.
func TestEventRing(t *testing.T) {
	// Event i is of pool "a" when i is even, "b" when odd.
	seq := func(from, to, step int) []string {
		var out []string
		for i := from; i < to; i += step {
			out = append(out, fmt.Sprint(i))
		}
		return out
	}
	cases := []struct {
		name  string
		added int
		pool  string
		want  []string
	}{
		{"none", 0, "", nil},
		{"one", 1, "", []string{"0"}},
		{"not yet full", 99, "", seq(0, 99, 1)},
		{"exactly full", 100, "", seq(0, 100, 1)},
		{"wrapped by one", 101, "", seq(1, 101, 1)},
		{"wrapped more than once", 250, "", seq(150, 250, 1)},
		{"one pool", 10, "a", seq(0, 10, 2)},
		{"one pool, wrapped", 250, "b", seq(151, 250, 2)},
		{"a pool with no events", 250, "c", nil},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			var r eventRing
			for i := range c.added {
				r.add(Event{Pool: string(rune('a' + i%2)), Message: fmt.Sprint(i)})
			}
			got := r.list(c.pool)
			if got == nil {
				t.Fatal("list returned nil; the API answers [] for no events")
			}
			var msgs []string
			for _, e := range got {
				msgs = append(msgs, e.Message)
			}
			if !slices.Equal(msgs, c.want) {
				t.Errorf("after %d events, list(%q) = %v\nwant %v", c.added, c.pool, msgs, c.want)
			}
		})
	}
}

// A launch error, an instance's life and its reaping are recorded, in
// order, at the manager's clock, and nothing secret is in them.
func TestEventsRecorded(t *testing.T) {
	h := newHarness(t, func(p *Spec) { p.MinIdle = 1 })
	h.cloud.FailNext("launch", fmt.Errorf("no t3.small in us-east-1a: %w", cloud.ErrCapacity))
	failedAt := h.clock.Now()
	h.tick()
	events, err := h.m.Events("demo")
	if err != nil {
		t.Fatal(err)
	}
	i := slices.IndexFunc(events, func(e Event) bool { return e.Kind == EventLaunchError })
	if i < 0 || !strings.Contains(events[i].Message, "no t3.small") || !events[i].Time.Equal(failedAt) || events[i].Pool != "demo" {
		t.Fatalf("events after a failed launch: %+v; want a launch_error with the cloud's message at %s", events, failedAt)
	}

	h.clock.Advance(5 * time.Second) // past the backoff
	h.tick()
	id := h.only(Booting)
	h.ready(id)
	zero := 0
	if _, err := h.m.Scale(context.Background(), "demo", &zero, nil); err != nil {
		t.Fatal(err)
	}
	h.clock.Advance(h.opts.Pools["demo"].IdleTTD + time.Second)
	reapedAt := h.clock.Now()
	h.tick()
	if h.state(id) != Gone {
		t.Fatalf("%s is %s after idle_ttd, want gone", id, h.state(id))
	}

	events, err = h.m.Events("")
	if err != nil {
		t.Fatal(err)
	}
	type step struct {
		kind     EventKind
		from, to State
		reason   Reason
	}
	var got []step
	for _, e := range events {
		if e.Instance == id {
			got = append(got, step{e.Kind, e.From, e.To, e.Reason})
		}
		if e.Kind == EventReap && !e.Time.Equal(reapedAt) {
			t.Errorf("reap recorded at %s, want the manager's clock %s", e.Time, reapedAt)
		}
	}
	want := []step{
		{EventState, Launching, Booting, ReasonLaunched},
		{EventState, Booting, Idle, ReasonReady},
		{EventState, Idle, Terminating, ReasonIdleTTD},
		{EventReap, "", Terminating, ReasonIdleTTD},
		{EventState, Terminating, Gone, ""},
	}
	if !slices.Equal(got, want) {
		t.Errorf("events of %s:\n got %v\nwant %v", id, got, want)
	}
	if !slices.IsSortedFunc(events, func(a, b Event) int { return a.Time.Compare(b.Time) }) {
		t.Errorf("events not oldest first: %+v", events)
	}

	in := h.instance(id)
	raw, err := json.Marshal(events)
	if err != nil {
		t.Fatal(err)
	}
	for name, secret := range map[string]string{"password": in.Password, "token hash": in.TokenHash} {
		if secret != "" && strings.Contains(string(raw), secret) {
			t.Errorf("the instance's %s is in its events", name)
		}
	}

	if _, err := h.m.Events("nope"); !errors.Is(err, ErrUnknownPool) {
		t.Errorf("events of an unknown pool: %v, want ErrUnknownPool", err)
	}
}
