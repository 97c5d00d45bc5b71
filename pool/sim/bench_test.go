package sim

import (
	"context"
	"math"
	"math/rand/v2"
	"os"
	"strconv"
	"testing"
	"time"

	"github.com/hangar-ci/hangar/pool"
)

// busyCI is n jobs of a busy CI: Poisson arrivals whose rate follows the
// day (a peak in the afternoon, a trough at night, 14 jobs a minute on
// average at a million jobs over two weeks), lognormal durations (median
// 5 minutes).
func busyCI(n int, days float64) []Job {
	r := rand.New(rand.NewPCG(2030, 1))
	span := days * 86400
	mean := float64(n) / span // jobs a second
	peak := mean * 1.8
	out := make([]Job, 0, n)
	t := 0.0
	for len(out) < n {
		// Thinning: candidates at the peak rate, kept in proportion to
		// the rate at their moment.
		t += r.ExpFloat64() / peak
		rate := mean * (1 + 0.8*math.Sin(2*math.Pi*(t/86400-0.375)))
		if r.Float64()*peak > rate {
			continue
		}
		d := math.Exp(math.Log(300) + 0.9*r.NormFloat64())
		out = append(out, Job{Submit: time.Duration(t * 1e9), Duration: time.Duration(min(d, 6*3600) * 1e9), Pool: "ci", Line: len(out) + 2})
	}
	return out
}

// BenchmarkSimulate1M runs a million jobs (two weeks of a busy CI, some
// 400 builds at a time) through the pool under its config's fixed policy:
// the target is under a minute a run. HANGAR_SIM_JOBS makes it smaller,
// for profiling; HANGAR_SIM_POLICY picks another policy.
func BenchmarkSimulate1M(b *testing.B) {
	n := 1_000_000
	if v, err := strconv.Atoi(os.Getenv("HANGAR_SIM_JOBS")); err == nil && v > 0 {
		n = v
	}
	js := busyCI(n, 14*float64(n)/1e6)
	spec := pool.Spec{MinIdle: 4, MaxInstances: 3000, IdleTTD: 10 * time.Minute, BootTimeout: 5 * time.Minute,
		ClaimTimeout: 2 * time.Minute, Bootstrap: "builtin:generic.sh"}
	o := Options{Pools: map[string]pool.Spec{"ci": spec}, Boot: Boot{Fixed: time.Minute}, Seed: 1}
	policy := Config()
	switch os.Getenv("HANGAR_SIM_POLICY") {
	case "on-demand":
		policy = OnDemand()
	case "auto":
		policy = Auto()
	}
	b.ResetTimer()
	for b.Loop() {
		start := time.Now()
		r, err := Simulate(context.Background(), js, o, policy)
		if err != nil {
			b.Fatal(err)
		}
		b.ReportMetric(time.Since(start).Seconds(), "s/run")
		b.ReportMetric(float64(r.Launches), "launches")
	}
}
