package sim

import (
	"math/rand/v2"
	"slices"
	"testing"
	"time"
)

func TestOracleExamples(t *testing.T) {
	s := time.Second
	job := func(submit, duration time.Duration) Job { return Job{Submit: submit, Duration: duration} }
	for _, tc := range []struct {
		name string
		jobs []Job
		want time.Duration
	}{
		{"one job: a boot and its duration", []Job{job(100*s, 30*s)}, 60*s + 30*s},
		{"two jobs far apart: two boots", []Job{job(0, 10*s), job(1000*s, 10*s)}, 2*60*s + 20*s},
		{"two jobs close: one boot, idle across the gap", []Job{job(0, 10*s), job(30*s, 10*s)}, 60*s + 20*s + 20*s},
		{"overlapping jobs: two instances", []Job{job(0, 100*s), job(50*s, 100*s)}, 2*60*s + 200*s},
		{"a job submitted as another ends reuses it at no cost", []Job{job(0, 10*s), job(10*s, 10*s)}, 60*s + 20*s},
		{"the last freed instance is taken", []Job{job(0, 10*s), job(0, 20*s), job(25*s, 5*s), job(100*s, 5*s)},
			// instances A (ends 10) and B (ends 20); at 25 B is taken (gap
			// 5), A stays free from 10; at 100: A's gap 90 > 60, B's 70 > 60: boot.
			2*60*s + 40*s + 5*s + 60*s},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if got := Oracle(tc.jobs, 60*s); got != tc.want {
				t.Errorf("Oracle = %s, want %s", got, tc.want)
			}
		})
	}
}

// TestOracleIsOptimal holds the greedy against every schedule of small
// random traces: every partition of the jobs into instances whose jobs do
// not overlap, each costing a boot, its jobs, and min(gap, boot) between
// them.
func TestOracleIsOptimal(t *testing.T) {
	r := rand.New(rand.NewPCG(1, 2))
	for trial := range 300 {
		n := 1 + r.IntN(8)
		boot := time.Duration(1+r.IntN(20)) * time.Second
		jobs := make([]Job, n)
		for i := range jobs {
			// Small integers: ties and exact fits happen.
			jobs[i] = Job{Submit: time.Duration(r.IntN(60)) * time.Second, Duration: time.Duration(r.IntN(15)) * time.Second}
		}
		slices.SortStableFunc(jobs, func(a, b Job) int { return cmpDuration(a.Submit, b.Submit) })
		want := bruteForce(jobs, boot)
		if got := Oracle(jobs, boot); got != want {
			t.Fatalf("trial %d: boot %s, jobs %v: Oracle = %s, best schedule %s", trial, boot, jobs, got, want)
		}
	}
}

// bruteForce tries every assignment of jobs (in submit order) to
// instances: job i goes to a new instance or after the last job of an
// instance that has ended by its submit.
func bruteForce(jobs []Job, boot time.Duration) time.Duration {
	best := time.Duration(-1)
	ends := make([]time.Duration, 0, len(jobs)) // each instance's last job's end; never reallocated
	var try func(i int, cost time.Duration)
	try = func(i int, cost time.Duration) {
		if best >= 0 && cost >= best {
			return
		}
		if i == len(jobs) {
			best = cost
			return
		}
		j := jobs[i]
		for k := range len(ends) {
			if e := ends[k]; e <= j.Submit {
				ends[k] = j.Submit + j.Duration
				try(i+1, cost+min(j.Submit-e, boot)+j.Duration)
				ends[k] = e
			}
		}
		ends = append(ends, j.Submit+j.Duration)
		try(i+1, cost+boot+j.Duration)
		ends = ends[:len(ends)-1]
	}
	try(0, 0)
	return best
}
