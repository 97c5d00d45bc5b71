package pool

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/hangar-ci/hangar/pool/store"
)

// autoDriver plays a steady CI load on an autoscaled pool, by hand on the
// fake clock: a lease request every interval, each held for hold, and
// instances that report ready boot after their launch.
type autoDriver struct {
	h        *harness
	boot     time.Duration
	hold     time.Duration
	leases   []string             // requested, not yet released
	created  map[string]time.Time // lease → requested at
	assigned map[string]time.Time // lease → first seen active
	instance map[string]string    // lease → its instance's id
	waits    []time.Duration      // of every lease assigned
	// singleUse: instances end with their lease (max_uses = 1).
	singleUse bool
}

func newAutoHarness(t *testing.T, mod func(*Spec)) *harness {
	return newHarness(t, func(s *Spec) {
		s.MaxInstances = 20
		s.Autoscale = &AutoscaleSpec{TargetWaitP95: 5 * time.Second, MaxIdle: 10}
		if mod != nil {
			mod(s)
		}
	})
}

func newAutoDriver(h *harness, boot, hold time.Duration) *autoDriver {
	return &autoDriver{h: h, boot: boot, hold: hold, created: map[string]time.Time{}, assigned: map[string]time.Time{}, instance: map[string]string{}}
}

// step moves the clock on by dt, boots what is due, releases what is due,
// requests a lease if request, and ticks.
func (d *autoDriver) step(dt time.Duration, request bool) {
	h := d.h
	h.t.Helper()
	h.clock.Advance(dt)
	now := h.clock.Now()
	for _, id := range h.ids(Booting) {
		if now.Sub(h.instance(id).LaunchedAt) >= d.boot {
			h.ready(id)
		}
	}
	var keep []string
	for _, id := range d.leases {
		v := h.getLease(id) // claims it, as its waiting client would
		if v.State == LeaseActive {
			if _, ok := d.assigned[id]; !ok {
				d.assigned[id] = now
				d.instance[id] = v.Instance.ID
				d.waits = append(d.waits, now.Sub(d.created[id]))
			}
		}
		if at, ok := d.assigned[id]; ok && now.Sub(at) >= d.hold {
			h.release(id, false)
			if !d.singleUse { // a single-use instance is ended, not released
				h.cleanRelease(d.instance[id], id)
			}
			continue
		}
		keep = append(keep, id)
	}
	d.leases = keep
	if request {
		v := h.lease(LeaseRequest{})
		d.leases = append(d.leases, v.ID)
		d.created[v.ID] = now
		if v.State == LeaseActive {
			d.assigned[v.ID] = now
			d.instance[v.ID] = v.Instance.ID
			d.waits = append(d.waits, 0)
		}
	}
	h.tick()
}

// run steps for total, a request every every (0: none).
func (d *autoDriver) run(total, every time.Duration) {
	const dt = 10 * time.Second
	for t := dt; t <= total; t += dt {
		d.step(dt, every > 0 && t%every == 0)
	}
}

func (h *harness) autoscale() AutoscaleView {
	h.t.Helper()
	v := h.pool()
	if v.Autoscale == nil {
		h.t.Fatalf("pool view has no autoscale: %+v", v)
	}
	return *v.Autoscale
}

// Under a steady load the pool learns the rate and its boot time and keeps
// spares, so that requests stop waiting for boots; when the load stops, the
// target falls to nothing and the spares are reaped.
func TestAutoscaleFollowsDemand(t *testing.T) {
	h := newAutoHarness(t, nil)
	if a := h.autoscale(); a.TargetIdle != 0 || a.Reason != "rate 0/min, boot 60s" || h.pool().MinIdle != 0 {
		t.Fatalf("a new pool's autoscale: %+v, want no spares and the default boot", a)
	}
	d := newAutoDriver(h, 90*time.Second, 3*time.Minute)
	// Two requests a minute for 20 minutes, each held 3 minutes.
	d.run(20*time.Minute, 30*time.Second)
	// The clock is 5s into a minute that saw a request at once: the
	// five-minute window has 9 requests in 4m05s, 2.2 a minute.
	a := h.autoscale()
	if a.Reason != "rate 2.2/min, boot 90s, 2 freeing" || a.BootSeconds != 90 || a.RatePerMinute < 2 || a.RatePerMinute > 2.25 {
		t.Errorf("after 20 minutes of 2/min booting in 90s: %+v", a)
	}
	// W = 85s: Poisson(3.12) needs 8 for 97%, less 2 of the ~2.8 leases
	// of 3 minutes expected to end within 85s.
	if a.TargetIdle != 6 || a.IdleTTDSeconds != 90 || h.pool().MinIdle != 6 {
		t.Errorf("target %d, TTD %vs, min_idle %d; want 6, 90s (a boot), 6", a.TargetIdle, a.IdleTTDSeconds, h.pool().MinIdle)
	}
	// The first requests waited for boots; once the pool had learnt, none.
	late := d.waits[len(d.waits)-20:]
	for _, w := range late {
		if w != 0 {
			t.Errorf("waits of the last 20 leases %v, want all served at once", late)
			break
		}
	}
	if slices.Max(d.waits[:3]) < 90*time.Second {
		t.Errorf("waits of the first leases %v: they should have waited for a boot", d.waits[:3])
	}
	if idle := len(h.ids(Idle)) + len(h.ids(Booting)); idle < 6 {
		t.Errorf("idle and booting %d, want at least the target 6", idle)
	}

	// The load stops: the leases end, the rate decays over half an hour,
	// and every spare goes, one boot time after the target no longer
	// holds it.
	d.run(45*time.Minute, 0)
	a = h.autoscale()
	if a.TargetIdle != 0 || !strings.HasPrefix(a.Reason, "rate 0/min") {
		t.Errorf("45 minutes after the last request: %+v, want no spares", a)
	}
	if live := append(h.ids(Idle), h.ids(Booting)...); len(live) != 0 {
		t.Errorf("idle and booting %v, want all reaped", live)
	}
}

// A restart keeps what the pool learnt: the history is in the store, and
// the restarted pool keeps the same spares at once.
func TestAutoscaleHistorySurvivesRestart(t *testing.T) {
	h := newAutoHarness(t, nil)
	d := newAutoDriver(h, 90*time.Second, 3*time.Minute)
	d.run(20*time.Minute, 30*time.Second)
	before := h.autoscale()
	if before.TargetIdle == 0 {
		t.Fatalf("no spares before the restart: %+v", before)
	}
	h.restart()
	if after := h.autoscale(); after != before {
		t.Errorf("after a restart: %+v\nbefore:              %+v", after, before)
	}
	// A fresh store knows nothing.
	h2 := newAutoHarness(t, nil)
	if a := h2.autoscale(); a.TargetIdle != 0 || a.Reason != "rate 0/min, boot 60s" {
		t.Errorf("a new pool on an empty store: %+v", a)
	}
}

// The history is written at most once a minute, whatever the requests.
func TestAutoscaleHistoryWrites(t *testing.T) {
	h := newAutoHarness(t, nil)
	d := newAutoDriver(h, 30*time.Second, time.Hour)
	now := h.clock.Now()
	h.clock.Advance(now.Truncate(time.Minute).Add(time.Minute + time.Second).Sub(now))
	// The first request of a minute is written with its decision…
	d.step(0, true)
	before := storedArrivals(t, h)
	if before != 1 {
		t.Fatalf("stored arrivals %d after the first request of a minute, want 1", before)
	}
	// … the next ten within that minute are not.
	for range 10 {
		d.step(5*time.Second, true)
	}
	if got := storedArrivals(t, h); got != before {
		t.Errorf("stored arrivals %d within the minute of 10 requests, want still %d", got, before)
	}
	h.clock.Advance(time.Minute)
	h.tick()
	if got := storedArrivals(t, h); got != before+10 {
		t.Errorf("stored arrivals %d in the next minute, want %d", got, before+10)
	}
}

// storedArrivals is the count of requests in the pool's stored history.
func storedArrivals(t *testing.T, h *harness) int {
	t.Helper()
	h.m.mu.Lock()
	saved := h.m.synced()
	h.m.unlock()
	if err := saved.Wait(); err != nil {
		t.Fatal(err)
	}
	recs, err := store.Load[*demand](h.store, store.Demand)
	if err != nil {
		t.Fatal(err)
	}
	n := 0
	if d := recs["demo"]; d != nil {
		for _, c := range d.Minutes.Counts {
			n += int(c)
		}
	}
	return n
}

// Two runs of the same load decide the same, step by step.
func TestAutoscaleDeterministic(t *testing.T) {
	trace := func() []string {
		h := newAutoHarness(t, nil)
		d := newAutoDriver(h, 70*time.Second, 150*time.Second)
		var out []string
		for i := range 120 {
			d.step(10*time.Second, i%4 == 0 || i%7 == 0)
			a := h.autoscale()
			out = append(out, fmt.Sprintf("%d %s %v idle=%d", a.TargetIdle, a.Reason, a.IdleTTDSeconds, len(h.ids(Idle))))
		}
		return out
	}
	a, b := trace(), trace()
	if !slices.Equal(a, b) {
		for i := range a {
			if a[i] != b[i] {
				t.Fatalf("step %d: %q, then %q", i, a[i], b[i])
			}
		}
	}
	if !slices.ContainsFunc(a, func(s string) bool { return !strings.HasPrefix(s, "0 ") }) {
		t.Errorf("the load never asked for spares: %v", a)
	}
}

// hangar scale --min-idle is refused on an autoscaled pool; --max is not.
func TestScaleAutoscaledPool(t *testing.T) {
	h := newAutoHarness(t, nil)
	two := 2
	_, err := h.m.Scale(context.Background(), "demo", &two, nil)
	if !errors.Is(err, ErrInvalid) || !strings.Contains(err.Error(), `pool demo sizes its spares itself (min_idle = "auto")`) {
		t.Errorf("scale --min-idle on an autoscaled pool: %v", err)
	}
	eight := 8
	v, err := h.m.Scale(context.Background(), "demo", nil, &eight)
	if err != nil || v.MaxInstances != 8 || v.Autoscale == nil {
		t.Errorf("scale --max on an autoscaled pool: %+v, %v", v, err)
	}
}

// The pool counts its requests' outcomes: every request, those that waited
// longer than the target (at their release), and the quiets between its
// pushes; the idle rule reads them.
func TestAutoscaleCountsOutcomes(t *testing.T) {
	h := newAutoHarness(t, nil)
	d := newAutoDriver(h, 90*time.Second, 3*time.Minute)
	// A request every 30 s for 20 minutes, then time for all to end.
	d.run(20*time.Minute, 30*time.Second)
	d.run(10*time.Minute, 0)
	late := 0
	for _, w := range d.waits {
		if w > 5*time.Second {
			late++
		}
	}
	if late == 0 || late == len(d.waits) || len(d.waits) != 40 {
		t.Fatalf("waits %v: want 40, some of them late", d.waits)
	}
	h.m.mu.Lock()
	dm := *h.m.pools["demo"].auto.demand
	h.m.unlock()
	// Each count decays by 1/outcomeMemory a request: 40 requests count
	// a little under 40.
	if dm.Requests < 39 || dm.Requests > 40 || dm.Late < float64(late)-1 || dm.Late > float64(late) || dm.Deliberate != 0 {
		t.Errorf("requests %.2f, late %.2f, deliberate %.2f; want about 40, %d, 0", dm.Requests, dm.Late, dm.Deliberate, late)
	}
	// One request a push, 30 s apart: 38 closed pushes after a quiet of
	// 30 s (the first had none), the last still open.
	if len(dm.Gaps) != 38 || dm.Gaps[0] != (gapSample{30, 1}) || dm.Gaps[37] != (gapSample{30, 1}) {
		t.Errorf("gaps %v, want 38 of 30 s", dm.Gaps)
	}
}

// Leases whose instances end with them (max_uses reached) free nothing:
// the spares are not cut for them.
func TestAutoscaleFreesOnlyReturningInstances(t *testing.T) {
	reason := func(maxUses int) string {
		h := newAutoHarness(t, func(s *Spec) { s.MaxUses = maxUses })
		d := newAutoDriver(h, 90*time.Second, 3*time.Minute)
		d.singleUse = maxUses == 1
		d.run(20*time.Minute, 30*time.Second)
		return h.autoscale().Reason
	}
	if r := reason(0); !strings.Contains(r, "freeing") {
		t.Errorf("reused instances: reason %q, want leases expected to free some", r)
	}
	if r := reason(1); strings.Contains(r, "freeing") {
		t.Errorf("single-use instances: reason %q, want none counted as freeing", r)
	}
}
