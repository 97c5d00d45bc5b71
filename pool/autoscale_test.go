package pool

import (
	"math"
	"strings"
	"testing"
	"time"
)

// perMin is a rate of n a minute, a second.
func perMin(n float64) float64 { return n / 60 }

// The arithmetic of DecideAutoscale, case by case, as buildkite-agent-scaler
// tests its own. The expected spares were computed apart from this code
// (Python: the compound Poisson count summed over the number of pushes,
// convolved with the place in a push): S = Q97(requests ahead within
// boot − target) + 1 − ⌊frees⌋.
func TestDecideAutoscale(t *testing.T) {
	base := AutoscaleInput{
		BootP50: time.Minute, BootP90: time.Minute,
		TargetWaitP95: 5 * time.Second, MaxIdle: 20, MaxInstances: 100, IdleTTD: 10 * time.Minute,
	}
	for _, tc := range []struct {
		name   string
		mod    func(*AutoscaleInput)
		target int
		ttd    time.Duration
		reason string
	}{{
		name:   "no demand keeps no spares",
		mod:    func(in *AutoscaleInput) {},
		target: 0, ttd: time.Minute, reason: "rate 0/min, boot 60s",
	}, {
		// Poisson(2.1/60·55 = 1.925): P(N ≤ 5) = 0.9856 is the first ≥ 0.97.
		name:   "smooth demand",
		mod:    func(in *AutoscaleInput) { in.RecentRate = perMin(2.1) },
		target: 6, ttd: time.Minute, reason: "rate 2.1/min, boot 60s",
	}, {
		name:   "pushes of one request are the same",
		mod:    func(in *AutoscaleInput) { in.RecentRate, in.Batches = perMin(2.1), []int{1, 1, 1, 1} },
		target: 6, ttd: time.Minute, reason: "rate 2.1/min, boot 60s",
	}, {
		name:   "pushes of five requests of the same rate need more",
		mod:    func(in *AutoscaleInput) { in.RecentRate, in.Batches = perMin(2.1), []int{5, 5, 5} },
		target: 13, ttd: time.Minute, reason: "rate 2.1/min, boot 60s",
	}, {
		name:   "single jobs and matrices",
		mod:    func(in *AutoscaleInput) { in.RecentRate, in.Batches = perMin(2.1), []int{1, 1, 3, 7, 12} },
		target: 19, ttd: time.Minute, reason: "rate 2.1/min, boot 60s",
	}, {
		name:   "big matrices ask for more than max_idle",
		mod:    func(in *AutoscaleInput) { in.RecentRate, in.Batches = perMin(2.1), []int{1, 12} },
		target: 20, ttd: time.Minute, reason: "rate 2.1/min, boot 60s, max_idle",
	}, {
		name:   "a trickle of matrices of 8 needs 8",
		mod:    func(in *AutoscaleInput) { in.RecentRate, in.Batches = perMin(0.1), []int{8, 8} },
		target: 8, ttd: time.Minute, reason: "rate 0.1/min, boot 60s",
	}, {
		// One request in ten minutes: another within the 55 s before it
		// has taken the one spare 8.8% of the time, more than 3%.
		name:   "a trickle still wants spares without a history",
		mod:    func(in *AutoscaleInput) { in.RecentRate = perMin(0.1) },
		target: 2, ttd: time.Minute, reason: "rate 0.1/min, boot 60s",
	}, {
		name:   "the history's rate anticipates a rush the recent rate has not seen",
		mod:    func(in *AutoscaleInput) { in.HistoryRate = perMin(2.1) },
		target: 6, ttd: time.Minute, reason: "rate 2.1/min, boot 60s",
	}, {
		name:   "the higher of recent and history",
		mod:    func(in *AutoscaleInput) { in.RecentRate, in.HistoryRate = perMin(2.1), perMin(0.1) },
		target: 6, ttd: time.Minute, reason: "rate 2.1/min, boot 60s",
	}, {
		// Poisson(2.1/60·30 = 1.05): Q97 = 3.
		name:   "a longer target wait needs fewer",
		mod:    func(in *AutoscaleInput) { in.RecentRate, in.TargetWaitP95 = perMin(2.1), 30*time.Second },
		target: 4, ttd: time.Minute, reason: "rate 2.1/min, boot 60s",
	}, {
		name:   "a target wait of a boot needs none",
		mod:    func(in *AutoscaleInput) { in.RecentRate, in.TargetWaitP95 = perMin(100), time.Minute },
		target: 0, ttd: time.Minute, reason: "rate 100/min, boot 60s, boot within target",
	}, {
		name:   "a target wait beyond a boot needs none",
		mod:    func(in *AutoscaleInput) { in.RecentRate, in.TargetWaitP95 = perMin(100), 5*time.Minute },
		target: 0, ttd: time.Minute, reason: "rate 100/min, boot 60s, boot within target",
	}, {
		// Poisson(2.1/60·115 = 4.025): Q97 = 8.
		name: "spares plan for the slow boots, the TTD for the typical",
		mod: func(in *AutoscaleInput) {
			in.RecentRate, in.BootP50, in.BootP90 = perMin(2.1), 30*time.Second, 2*time.Minute
		},
		target: 9, ttd: 30 * time.Second, reason: "rate 2.1/min, boot 30s",
	}, {
		name:   "releases expected soon stand in for spares",
		mod:    func(in *AutoscaleInput) { in.RecentRate, in.ExpectedFrees = perMin(2.1), 2.9 },
		target: 4, ttd: time.Minute, reason: "rate 2.1/min, boot 60s, 2 freeing",
	}, {
		name:   "releases covering the demand leave no spares",
		mod:    func(in *AutoscaleInput) { in.RecentRate, in.ExpectedFrees = perMin(2.1), 10 },
		target: 0, ttd: time.Minute, reason: "rate 2.1/min, boot 60s, 10 freeing",
	}, {
		name:   "less than one release expected counts none",
		mod:    func(in *AutoscaleInput) { in.RecentRate, in.ExpectedFrees = perMin(2.1), 0.99 },
		target: 6, ttd: time.Minute, reason: "rate 2.1/min, boot 60s",
	}, {
		name:   "a huge rate is capped at max_idle",
		mod:    func(in *AutoscaleInput) { in.RecentRate = perMin(100000) },
		target: 20, ttd: time.Minute, reason: "rate 100000/min, boot 60s, max_idle",
	}, {
		name:   "max_idle of 0 keeps none",
		mod:    func(in *AutoscaleInput) { in.RecentRate, in.MaxIdle = perMin(60), 0 },
		target: 0, ttd: time.Minute, reason: "rate 60/min, boot 60s, max_idle",
	}, {
		name:   "max_instances less the busy ones caps it",
		mod:    func(in *AutoscaleInput) { in.RecentRate, in.MaxInstances, in.Busy = perMin(2.1), 10, 7 },
		target: 3, ttd: time.Minute, reason: "rate 2.1/min, boot 60s, max_instances",
	}, {
		name:   "a pool busier than max_instances keeps none",
		mod:    func(in *AutoscaleInput) { in.RecentRate, in.MaxInstances, in.Busy = perMin(2.1), 4, 6 },
		target: 0, ttd: time.Minute, reason: "rate 2.1/min, boot 60s, max_instances",
	}, {
		name: "idle_ttd bounds the TTD",
		mod: func(in *AutoscaleInput) {
			in.BootP50, in.BootP90, in.IdleTTD = 5*time.Minute, 5*time.Minute, 2*time.Minute
		},
		target: 0, ttd: 2 * time.Minute, reason: "rate 0/min, boot 5m",
	}, {
		name:   "no idle_ttd: the boot alone",
		mod:    func(in *AutoscaleInput) { in.BootP50, in.BootP90, in.IdleTTD = 5*time.Minute, 5*time.Minute, 0 },
		target: 0, ttd: 5 * time.Minute, reason: "rate 0/min, boot 5m",
	}, {
		name:   "an instant boot still keeps an idle instance a second",
		mod:    func(in *AutoscaleInput) { in.BootP50, in.BootP90 = 0, 0 },
		target: 0, ttd: time.Second, reason: "rate 0/min, boot 0s",
	}, {
		name:   "a negative rate is none",
		mod:    func(in *AutoscaleInput) { in.RecentRate = -1 },
		target: 0, ttd: time.Minute, reason: "rate 0/min, boot 60s",
	}} {
		t.Run(tc.name, func(t *testing.T) {
			in := base
			tc.mod(&in)
			got := DecideAutoscale(in)
			if got.TargetIdle != tc.target || got.IdleTTD != tc.ttd || got.Reason != tc.reason {
				t.Errorf("DecideAutoscale = target %d, ttd %s, reason %q; want %d, %s, %q",
					got.TargetIdle, got.IdleTTD, got.Reason, tc.target, tc.ttd, tc.reason)
			}
		})
	}
}

// The idle rule: spares while the last request is at most ActiveFor old,
// planned for at least the ActiveRate; none, on purpose, after.
func TestDecideAutoscaleIdle(t *testing.T) {
	base := AutoscaleInput{
		BootP50: time.Minute, BootP90: time.Minute,
		TargetWaitP95: 5 * time.Second, MaxIdle: 20, MaxInstances: 100,
		ActiveFor: 2 * time.Hour, ActiveRate: perMin(2.1),
	}
	for _, tc := range []struct {
		name       string
		mod        func(*AutoscaleInput)
		target     int
		deliberate bool
		reason     string
	}{{
		// The windows are empty half an hour after a push; the rate
		// while spares are kept is planned for: as "smooth demand".
		name:   "within ActiveFor, the active rate",
		mod:    func(in *AutoscaleInput) { in.Since = 30 * time.Minute },
		target: 6, reason: "rate 2.1/min, boot 60s",
	}, {
		name:   "at ActiveFor, still",
		mod:    func(in *AutoscaleInput) { in.Since = 2 * time.Hour },
		target: 6, reason: "rate 2.1/min, boot 60s",
	}, {
		// At the active rate of 0.1/min it would be 2 ("a trickle").
		name: "a higher windowed rate wins",
		mod: func(in *AutoscaleInput) {
			in.Since, in.RecentRate, in.ActiveRate = time.Minute, perMin(2.1), perMin(0.1)
		},
		target: 6, reason: "rate 2.1/min, boot 60s",
	}, {
		name:   "past ActiveFor: idle, whatever the history says",
		mod:    func(in *AutoscaleInput) { in.Since, in.HistoryRate = 3*time.Hour+59*time.Second, perMin(2.1) },
		target: 0, deliberate: true, reason: "rate 2.1/min, boot 60s, idle 3h0m",
	}, {
		name:   "past ActiveFor with no other rate: idle too",
		mod:    func(in *AutoscaleInput) { in.Since = 150 * time.Minute },
		target: 0, deliberate: true, reason: "rate 0/min, boot 60s, idle 2h30m",
	}, {
		// ActiveRate is then the rate since the history began: a young
		// pool's first long quiet may be a coffee break, not a night.
		name: "ActiveFor not known yet: the rate since the history began",
		mod: func(in *AutoscaleInput) {
			in.ActiveFor, in.Since, in.RecentRate, in.ActiveRate = 0, 10*time.Hour, 0, perMin(2.1)
		},
		target: 6, reason: "rate 2.1/min, boot 60s",
	}, {
		name: "ActiveFor not known yet: a higher windowed rate wins",
		mod: func(in *AutoscaleInput) {
			in.ActiveFor, in.Since, in.RecentRate, in.ActiveRate = 0, time.Minute, perMin(0.1), perMin(0.01)
		},
		target: 2, reason: "rate 0.1/min, boot 60s",
	}, {
		name:   "ActiveFor not known yet, no demand",
		mod:    func(in *AutoscaleInput) { in.ActiveFor, in.Since, in.ActiveRate = 0, time.Minute, 0 },
		target: 0, reason: "rate 0/min, boot 60s",
	}} {
		t.Run(tc.name, func(t *testing.T) {
			in := base
			tc.mod(&in)
			got := DecideAutoscale(in)
			if got.TargetIdle != tc.target || got.Deliberate != tc.deliberate || got.Reason != tc.reason {
				t.Errorf("DecideAutoscale = target %d, deliberate %v, reason %q; want %d, %v, %q",
					got.TargetIdle, got.Deliberate, got.Reason, tc.target, tc.deliberate, tc.reason)
			}
		})
	}
}

// The idle rule spends what the late budget leaves of the misses.
func TestIdleShare(t *testing.T) {
	for _, tc := range []struct{ missed, want float64 }{
		{-1, startIdleShare}, {0, lateBudget}, {0.01, lateBudget - 0.01}, {lateBudget, 0}, {0.2, 0},
	} {
		if got := IdleShare(tc.missed); math.Abs(got-tc.want) > 1e-12 {
			t.Errorf("IdleShare(%v) = %v, want %v", tc.missed, got, tc.want)
		}
	}
}

// More demand never asks for fewer spares, nor burstier demand, nor a
// slower boot, nor a stricter target.
func TestDecideAutoscaleMonotone(t *testing.T) {
	base := AutoscaleInput{BootP50: time.Minute, BootP90: time.Minute,
		TargetWaitP95: 5 * time.Second, MaxIdle: 1000, MaxInstances: 10000}
	spares := func(mod func(*AutoscaleInput)) int {
		in := base
		mod(&in)
		return DecideAutoscale(in).TargetIdle
	}
	prev := 0
	for r := 0.0; r <= 600; r += 0.5 {
		s := spares(func(in *AutoscaleInput) { in.RecentRate = perMin(r) })
		if s < prev {
			t.Fatalf("rate %.1f/min: %d spares, fewer than %d at a lower rate", r, s, prev)
		}
		prev = s
	}
	prev = 0
	for b := 1; b <= 60; b++ {
		s := spares(func(in *AutoscaleInput) { in.RecentRate, in.Batches = perMin(5), []int{1, b} })
		if s < prev {
			t.Fatalf("pushes of 1 and %d: %d spares, fewer than %d for smaller ones", b, s, prev)
		}
		prev = s
	}
	prev = math.MaxInt
	for w := time.Duration(0); w <= 2*time.Minute; w += time.Second {
		s := spares(func(in *AutoscaleInput) { in.RecentRate, in.TargetWaitP95 = perMin(5), w })
		if s > prev {
			t.Fatalf("target %s: %d spares, more than %d for a stricter target", w, s, prev)
		}
		prev = s
	}
	prev = 0
	for b := time.Duration(0); b <= 5*time.Minute; b += 5 * time.Second {
		s := spares(func(in *AutoscaleInput) { in.RecentRate, in.BootP90 = perMin(5), b })
		if s < prev {
			t.Fatalf("boot %s: %d spares, fewer than %d for a faster boot", b, s, prev)
		}
		prev = s
	}
}

// aheadQuantile against quantiles computed apart (Python, summing the
// compound Poisson count over the number of pushes).
func TestAheadQuantile(t *testing.T) {
	for _, tc := range []struct {
		mu      float64
		batches []int
		limit   int
		want    int
	}{
		{0, nil, 100, 0}, {-3, nil, 100, 0}, {math.NaN(), nil, 100, 0}, {1, nil, 0, 0},
		{0.5, nil, 100, 2}, {3, nil, 100, 7}, {3, []int{1}, 100, 7},
		{1.925, []int{5}, 100, 12}, {1.925, []int{1, 12}, 100, 22}, {1.925, []int{1, 1, 3, 7, 12}, 100, 18},
		{2.1 / 60 * 115, nil, 100, 8},
		// Clamped at the limit: not summed further.
		{1.925, []int{1, 12}, 10, 10}, {3, nil, 5, 5},
		// Far more pushes than can be summed.
		{1e6, nil, 50, 50},
	} {
		if got := aheadQuantile(tc.mu, tc.batches, 0.97, tc.limit); got != tc.want {
			t.Errorf("aheadQuantile(%v, %v, 0.97, %d) = %d, want %d", tc.mu, tc.batches, tc.limit, got, tc.want)
		}
	}
}

func TestAutoscaleReasonFormat(t *testing.T) {
	for _, tc := range []struct {
		rate float64
		boot time.Duration
		want string
	}{
		{perMin(0.033), 58 * time.Second, "rate 0.033/min, boot 58s"},
		{perMin(2.14), 58400 * time.Millisecond, "rate 2.1/min, boot 58s"},
		{perMin(12.6), 119 * time.Second, "rate 13/min, boot 119s"},
		{perMin(1), 150 * time.Second, "rate 1.0/min, boot 2m30s"},
	} {
		got := DecideAutoscale(AutoscaleInput{RecentRate: tc.rate, BootP50: tc.boot, BootP90: tc.boot, TargetWaitP95: time.Hour}).Reason
		if !strings.HasPrefix(got, tc.want) {
			t.Errorf("reason %q, want it to start %q", got, tc.want)
		}
	}
}
