package sim

import (
	"container/heap"
	"time"
)

// Oracle returns the instance-time of a clairvoyant schedule of jobs (in
// submit order, all of one pool) with zero wait: each instance boots
// exactly boot before its first job and ends right after its last, and a
// job runs on an instance that is free when it is submitted whenever
// idling across the gap is cheaper than a new boot. The sum is exact, in
// O(n log n):
//
// Every job costs its duration, plus, on an instance that has run jobs
// before, the gap since its last one ends, g, or, on a new instance, its
// boot, B; and a gap longer than B is never worth idling across: end the
// instance and boot a new one. So a job's cost beyond its duration is
// f(g) = min(g, B), or B for a new instance, and f is concave and
// nondecreasing. The greedy below gives each job, in submit order, the
// free instance freed last (the smallest gap), or a new one when none is
// free. It is optimal by exchange:
//
//   - Taking a free instance never costs more than booting a new one: it
//     costs f(g) ≤ B now, and the new instance's only advantage, keeping
//     the free one (freed at e) for a later job at t' > t, saves that job
//     at most B − f(t'−e) ≤ B − f(t−e), the extra paid now.
//   - Among free instances freed at e1 < e2 for a job at t, with the other
//     one going to a later job at t' (or to none, which is the case
//     t' = ∞), the greedy pays f(t−e2) + f(t'−e1) and the other choice
//     f(t−e1) + f(t'−e2). Both pairs of gaps have the same sum, and the
//     greedy's spans the other's (t−e2 is the least of the four, t'−e1
//     the greatest), so by concavity of f it costs no more.
//
// TestOracleIsOptimal holds it against every schedule of small traces.
func Oracle(jobs []Job, boot time.Duration) time.Duration {
	var total time.Duration
	var busy endHeap         // instances running a job, by when it ends
	var free []time.Duration // when each free instance's last job ended; the last freed on top
	for _, j := range jobs {
		for len(busy) > 0 && busy[0] <= j.Submit {
			// The heap gives them in the order they end, so the stack
			// stays sorted: its top is the last freed.
			free = append(free, heap.Pop(&busy).(time.Duration))
		}
		cost := boot
		if n := len(free); n > 0 {
			cost = min(j.Submit-free[n-1], boot)
			free = free[:n-1]
		}
		total += cost + j.Duration
		heap.Push(&busy, j.Submit+j.Duration)
	}
	return total
}

type endHeap []time.Duration

func (h endHeap) Len() int           { return len(h) }
func (h endHeap) Less(i, j int) bool { return h[i] < h[j] }
func (h endHeap) Swap(i, j int)      { h[i], h[j] = h[j], h[i] }
func (h *endHeap) Push(x any)        { *h = append(*h, x.(time.Duration)) }
func (h *endHeap) Pop() any {
	old := *h
	x := old[len(old)-1]
	*h = old[:len(old)-1]
	return x
}
