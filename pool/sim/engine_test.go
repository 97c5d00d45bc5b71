package sim

import (
	"bytes"
	"context"
	"math/rand/v2"
	"strings"
	"testing"
	"time"

	"github.com/hangar-ci/hangar/pool"
)

const s = time.Second

func testSpec(mod func(*pool.Spec)) map[string]pool.Spec {
	spec := pool.Spec{
		Provider:     "ignored",
		MaxInstances: 50,
		IdleTTD:      10 * time.Minute,
		BootTimeout:  5 * time.Minute,
		LeaseTTL:     time.Hour,
		MaxLeaseTTL:  time.Hour,
		ClaimTimeout: 2 * time.Minute,
		Bootstrap:    "builtin:generic.sh",
	}
	if mod != nil {
		mod(&spec)
	}
	return map[string]pool.Spec{"demo": spec}
}

func jobs(pairs ...time.Duration) []Job {
	var out []Job
	for i := 0; i < len(pairs); i += 2 {
		out = append(out, Job{Submit: pairs[i], Duration: pairs[i+1], Pool: "demo", Line: 2 + i/2})
	}
	return out
}

func simulate(t *testing.T, js []Job, o Options, p Policy) Result {
	t.Helper()
	r, err := Simulate(context.Background(), js, o, p)
	if err != nil {
		t.Fatal(err)
	}
	return r
}

// TestTinyTraces: the pool's choices on traces small enough to work out by
// hand, to the second.
func TestTinyTraces(t *testing.T) {
	farApart := jobs(0, 10*s, 1000*s, 10*s)
	for _, tc := range []struct {
		name   string
		spec   func(*pool.Spec)
		policy Policy
		want   Result
	}{
		{"on-demand: a boot for every job", nil, OnDemand(),
			Result{WaitP50: 60 * s, WaitMax: 60 * s, InstanceTime: 2 * 70 * s, BootTime: 120 * s, Launches: 2}},
		{"an idle_ttd longer than the gap: one boot, idle across it",
			func(p *pool.Spec) { p.IdleTTD = time.Hour }, Config(),
			Result{WaitP50: 0, WaitMax: 60 * s, InstanceTime: 1010 * s, IdleTime: 930 * s, BootTime: 60 * s, Launches: 1}},
		{"an idle_ttd shorter than the gap: reaped at the tick after it, then a second boot",
			func(p *pool.Spec) { p.IdleTTD = 5 * time.Minute }, Config(),
			// idle from 70 s, reaped at the first tick after 370 s
			Result{WaitP50: 60 * s, WaitMax: 60 * s, InstanceTime: (70 + 301 + 70) * s, IdleTime: 301 * s, BootTime: 120 * s, Launches: 2}},
		{"min_idle 1: the older spare is reaped, the other kept",
			func(p *pool.Spec) { p.MinIdle, p.IdleTTD = 1, 5*time.Minute }, Config(),
			// A spare and an instance for job 1 boot from 0 s. Job 1 runs
			// from 60 s to 70 s on the first ready; the other spare, idle
			// from 60 s, is reaped at 361 s; job 1's instance is kept by
			// min_idle and serves job 2 at once; a new spare boots from
			// 1000 s until the trace ends at 1010 s.
			Result{WaitP50: 0, WaitMax: 60 * s, InstanceTime: (361 + 1010 + 10) * s, IdleTime: (301 + 930) * s, BootTime: (60 + 60 + 10) * s, Launches: 3}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			for _, every := range []bool{false, true} {
				o := Options{Pools: testSpec(tc.spec), Boot: Boot{Fixed: 60 * s}, EveryTick: every}
				got := simulate(t, farApart, o, tc.policy)
				w := tc.want
				if got.WaitP50 != w.WaitP50 || got.WaitMax != w.WaitMax || got.InstanceTime != w.InstanceTime ||
					got.IdleTime != w.IdleTime || got.BootTime != w.BootTime || got.Launches != w.Launches || got.Jobs != 2 {
					t.Errorf("every tick %v: got waits p50 %s max %s, instance %s, idle %s, boot %s, %d launches, %d jobs;\nwant waits p50 %s max %s, instance %s, idle %s, boot %s, %d launches",
						every, got.WaitP50, got.WaitMax, got.InstanceTime, got.IdleTime, got.BootTime, got.Launches, got.Jobs,
						w.WaitP50, w.WaitMax, w.InstanceTime, w.IdleTime, w.BootTime, w.Launches)
				}
			}
		})
	}
}

// randomTrace is n jobs of a bursty load with durations of seconds to
// minutes, over pools.
func randomTrace(seed uint64, n int, pools ...string) []Job {
	r := rand.New(rand.NewPCG(seed, 7))
	var out []Job
	t := time.Duration(0)
	for i := range n {
		if r.IntN(4) == 0 {
			t += time.Duration(r.IntN(900)) * s // a lull
		} else {
			t += time.Duration(r.IntN(20)) * s
		}
		j := Job{Submit: t, Duration: time.Duration(1+r.IntN(600)) * s, Pool: "demo", Line: i + 2}
		if len(pools) > 0 {
			j.Pool = pools[r.IntN(len(pools))]
		}
		out = append(out, j)
	}
	return out
}

// TestSteppingIsExact: stepping the pool only when its timers could act
// gives what stepping it at every tick, as Run does, gives.
func TestSteppingIsExact(t *testing.T) {
	js := randomTrace(3, 300)
	boot := Boot{Samples: []time.Duration{40 * s, 55 * s, 61500 * time.Millisecond, 90 * s, 400 * s}} // some time out
	for _, p := range []Policy{OnDemand(), Config(), Fixed(0, 0), Fixed(2, time.Minute), Fixed(4, 5*time.Minute), Fixed(1, 0)} {
		var got [2]Result
		for i, every := range []bool{false, true} {
			got[i] = simulate(t, js, Options{Pools: testSpec(func(s *pool.Spec) { s.MaxInstances = 12 }), Boot: boot, Seed: 5, EveryTick: every}, p)
		}
		if !equalResults(got[0], got[1]) {
			t.Errorf("policy %s min_idle %d idle_ttd %s:\nstepped when due %+v\nstepped every tick %+v", p.Name, *got[0].MinIdle, *got[0].IdleTTD, got[0], got[1])
		}
	}
}

func equalResults(a, b Result) bool {
	a.MinIdle, a.IdleTTD, b.MinIdle, b.IdleTTD = nil, nil, nil, nil
	return a == b
}

// TestDeterministic: the same inputs give the same report, byte for byte,
// with boot samples, several pools and parallel runs.
func TestDeterministic(t *testing.T) {
	trace := Trace{Jobs: randomTrace(9, 400, "a", "b"), HasPool: true}
	spec := testSpec(func(s *pool.Spec) { s.MinIdle, s.MaxInstances = 1, 10 })["demo"]
	o := Options{Pools: map[string]pool.Spec{"a": spec, "b": spec}, Boot: Boot{Samples: []time.Duration{30 * s, 60 * s, 75 * s}}, Seed: 42}
	policies := append([]Policy{OnDemand(), Config()}, Grid(o)[:8]...)
	var out [2]bytes.Buffer
	for i := range out {
		rep, err := Run(context.Background(), trace, o, policies)
		if err != nil {
			t.Fatal(err)
		}
		if err := rep.WriteJSON(&out[i]); err != nil {
			t.Fatal(err)
		}
	}
	if !bytes.Equal(out[0].Bytes(), out[1].Bytes()) {
		t.Fatalf("two runs differ:\n%s\n%s", out[0].String(), out[1].String())
	}
}

// TestUnservablePool: a pool that can launch nothing is an error naming it,
// not a simulation that never ends.
func TestUnservablePool(t *testing.T) {
	o := Options{Pools: testSpec(func(s *pool.Spec) { s.MaxInstances = 0 }), Boot: Boot{Fixed: 60 * s}}
	_, err := Simulate(context.Background(), jobs(0, s, 5*s, s), o, Config())
	if err == nil || !strings.Contains(err.Error(), "can never get an instance") {
		t.Fatalf("err = %v, want one saying the jobs can never get an instance", err)
	}
}

// TestAuto: the pool sizing its own spares runs under the simulation (it
// is stepped at every tick) and serves every job.
func TestAuto(t *testing.T) {
	js := randomTrace(11, 200)
	r := simulate(t, js, Options{Pools: testSpec(nil), Boot: Boot{Fixed: 60 * s}, Seed: 1}, Auto())
	if r.Jobs != 200 || r.MinIdle != nil || r.IdleTTD != nil || r.Launches == 0 {
		t.Errorf("auto: %+v; want 200 jobs, no fixed min_idle or idle_ttd, some launches", r)
	}
}
