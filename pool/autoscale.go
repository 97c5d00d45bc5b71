package pool

import (
	"fmt"
	"math"
	"strconv"
	"strings"
	"time"
)

// How a pool with min_idle = "auto" sizes its warm spares: DecideAutoscale
// is a pure function of the estimates the pool keeps (history.go), so that
// its arithmetic is table-tested apart from the pool.
//
// The model. Every lease request that finds no idle instance makes the
// pool launch one (dispatch keeps idle + coming = queue + target), and an
// instance taken from the spares is replaced at once by a launch that is
// ready one boot time B later. So at any moment the spares are the target
// S, less the requests of the last B whose replacements are still booting,
// plus the instances that leases gave back meanwhile. A request at time t
// is served within the target wait T if some instance is ready by t+T:
// the S spares, the F instances freed by then, and the replacements of
// requests made before t-(B-T) (ready by t+T) all count; only the requests
// of the last W = B-T are ahead of it and not yet replaced. It therefore
// waits longer than T exactly when the N requests made in the W before it
// have taken all S+F instances: N ≥ S+F. CI requests come in pushes (a
// push fans out to a matrix of jobs, all requested at once), so N is the
// requests of the other pushes of the last W, X, plus those ahead of it in
// its own push, Y. Pushes arrive as a Poisson process (by PASTA, a push
// sees the pool as it is on average), so X is compound Poisson: νW pushes
// expected, sizes drawn from the pool's latest pushes. Y is the place of a
// request in its push: a request is more likely to be in a big push (the
// size drawn by requests, not by pushes: P(B = b)·b/E[B]) and anywhere in
// it alike, so P(Y = j) = P(B > j)/E[B]. The share of requests waiting
// longer than T is then P(N ≥ S+F), and the smallest S with
// P(N ≤ S+F-1) ≥ p is
//
//	S = Q_p(X + Y) + 1 - F.
//
// Pushes of one request make X Poisson and Y 0: the textbook case. Pushes
// of many make Y the larger part: however rare the pushes, a matrix of 12
// needs 12 spares to start at once.
//
// Consequences: when T ≥ B, W ≤ 0 and no request ever waits longer than T
// (at most a boot), so S = 0. Any demand at all asks for one spare
// (Q_p ≥ 0, S ≥ 1): with none, every request waits a whole boot.
//
// The idle rule. p95 is over all of a pool's requests, not every
// moment's, and a spare kept through a long quiet for the push that ends
// it costs more instance-hours than all those kept in busy stretches. CI
// pushes come in working sessions: the longer since the last request, the
// less likely the next one soon. So the pool keeps spares for a while
// after each request, ActiveFor, and none after that ("idle"): the shortest
// quiet such that, among its latest pushes (weighted by their requests),
// those that came after a longer quiet are at most a share of the
// requests, which then wait a boot. While it keeps spares, it plans for at
// least the rate its requests came at while spares were kept (ActiveRate):
// between pushes far apart the windowed rates fall to nothing, and the
// spares with them, just before the next push. When not even the requests
// after the longest quiet seen fit in the share, the quiets cannot say
// where to stop, and the pool keeps spares for twice the longest: in its
// first days the next quiet is often the longest yet. Until it has seen
// enough quiets to read ActiveFor at all, it plans for at least its rate
// since its history began.
//
// The share is what the late budget (3.5%, a margin under the 5%) leaves
// once the pool has counted what its sizing misses: the requests that
// waited longer than T though they came while it meant to serve them.
// Those misses are not only the quantile's 3% (p = 0.97): a push that
// comes within a boot of another finds the spares taken and their
// replacements booting, which no spares kept before the first could avoid
// but twice as many. Where pushes come back to back that often, as on
// Bitcoin Core's CI (one job in twenty), the budget is often spent before
// the idle rule has any, and the pool keeps spares through every quiet up
// to twice the longest; where the sizing meets its quantile, the idle rule
// drops the spares through the nights and weekends.
//
// The TTD. An idle instance above the target costs its idle time; ending
// it and booting another when one is needed costs a boot (billed as much
// as idle time, and made to wait for besides). Keeping it for one boot time
// and ending it then is the classic rent-or-buy answer: whatever the next
// request's time, it never costs more than twice what a clairvoyant choice
// would (which is what the simulator's oracle does: it idles across a gap
// when the gap is shorter than a boot). The config's idle_ttd bounds it.
const (
	// lateBudget is the share of requests the pool lets wait longer than
	// the target: 5%, less a margin for what the feedback (missedShare)
	// learns late: a storm of pushes, the first days.
	lateBudget = 0.035
	// startIdleShare is the share the idle rule spends until the pool has
	// measured what its sizing misses.
	startIdleShare = 0.02
	// spareQuantile is the share of the other requests to be served within
	// the target wait.
	spareQuantile = 0.97
	// maxPushes is the pushes expected in a window beyond which the
	// quantile is not summed (e^-νW would underflow): the spares needed
	// are then beyond any max_idle.
	maxPushes = 700
)

// AutoscaleInput is what the pool knows of its demand, the estimates in.
type AutoscaleInput struct {
	// RecentRate is lease requests a second over the last minutes;
	// HistoryRate, at this time of the day or week by the history (0: no
	// history yet). The pool plans for the higher: a morning's rush is
	// met before it shows in the recent rate.
	RecentRate  float64
	HistoryRate float64
	// Since is the time since the latest request; ActiveFor, how long
	// after a request spares are kept (0: not known yet, always);
	// ActiveRate, the rate of requests while they were so kept, a second:
	// planned for while they are (see the idle rule above). Until ActiveFor
	// is known, ActiveRate is the rate since the history began: a young
	// pool's windowed rates fall to nothing in its first quiet of half an
	// hour, and it cannot tell that quiet from a night yet.
	Since      time.Duration
	ActiveFor  time.Duration
	ActiveRate float64
	// Batches are the sizes of the latest pushes, requests that came
	// together (a CI matrix); none: one at a time.
	Batches []int
	// BootP50 and BootP90 are quantiles of the pool's observed boot times
	// (launch to ready): the TTD weighs the typical one, the spares plan
	// for a slow one.
	BootP50, BootP90 time.Duration
	// ExpectedFrees is how many active leases are expected to end within
	// the planning window (PlanningWindow), their instances idle again.
	ExpectedFrees float64
	// Busy counts the instances that are neither idle nor booting:
	// max_instances leaves room for Busy fewer spares.
	Busy int

	TargetWaitP95 time.Duration
	MaxIdle       int
	MaxInstances  int
	// IdleTTD is the config's idle_ttd, an upper bound on the TTD (0: none).
	IdleTTD time.Duration
}

// AutoscaleDecision is the estimate out: the idle target and the TTD to
// reap the rest with.
type AutoscaleDecision struct {
	TargetIdle int
	// Deliberate: no spares on purpose (idle), though there is demand:
	// the requests that come meanwhile are expected to wait.
	Deliberate bool
	IdleTTD    time.Duration
	// Rate is the request rate planned for, a second.
	Rate float64
	Boot time.Duration // the typical boot, as shown
	// Reason says why, for `hangar pools`: "rate 2.1/min, boot 58s".
	Reason string
}

// IdleShare is the share of requests the idle rule may leave to wait,
// given the share the sizing missed (missed < 0: not measured yet): what
// the late budget leaves.
func IdleShare(missed float64) float64 {
	if missed < 0 {
		return startIdleShare
	}
	return max(lateBudget-missed, 0)
}

// PlanningWindow is W = B - T: the requests of the last W before a request
// are those whose instances cannot be ready within T of it.
func PlanningWindow(bootP90, targetWait time.Duration) time.Duration {
	return max(bootP90-targetWait, 0)
}

// DecideAutoscale sizes the spares (see the model above).
func DecideAutoscale(in AutoscaleInput) (d AutoscaleDecision) {
	rate := max(in.RecentRate, in.HistoryRate, 0)
	if in.ActiveFor == 0 || in.Since <= in.ActiveFor {
		rate = max(rate, in.ActiveRate)
	}
	d = AutoscaleDecision{Rate: rate, Boot: in.BootP50}
	d.IdleTTD = max(in.BootP50, time.Second)
	if in.IdleTTD > 0 {
		d.IdleTTD = min(d.IdleTTD, in.IdleTTD)
	}
	notes := []string{"rate " + perMinute(rate) + "/min", "boot " + seconds(in.BootP50)}
	defer func() { d.Reason = strings.Join(notes, ", ") }()

	w := PlanningWindow(in.BootP90, in.TargetWaitP95)
	switch {
	case in.ActiveFor > 0 && in.Since > in.ActiveFor:
		// Whatever the rates: the requests that come now are those the
		// rule lets wait, and are counted so (autoscaler.go).
		notes = append(notes, "idle "+seconds(in.Since.Truncate(time.Minute)))
		d.Deliberate = true
		return d
	case rate <= 0:
		return d
	case w <= 0:
		notes = append(notes, "boot within target")
		return d
	}
	frees := math.Floor(max(in.ExpectedFrees, 0))
	// Past this, the quantile is only clamped: not worth summing.
	limit := max(in.MaxIdle, 0) + int(frees) + 1
	s := aheadQuantile(rate*w.Seconds(), in.Batches, spareQuantile, limit) + 1 - int(frees)
	if frees >= 1 {
		notes = append(notes, fmt.Sprintf("%d freeing", int(frees)))
	}
	s = max(s, 0)
	if s > in.MaxIdle {
		s = in.MaxIdle
		notes = append(notes, "max_idle")
	}
	if room := max(in.MaxInstances-in.Busy, 0); s > room {
		s = room
		notes = append(notes, "max_instances")
	}
	d.TargetIdle = s
	return d
}

// aheadQuantile is the smallest k with P(X + Y ≤ k) ≥ p, or limit when
// that is larger: X counts the requests of the other pushes of a window in
// which mu requests are expected, Y those ahead of a request in its own
// push (see the model above); pushes have the sizes of batches (none: one
// request each).
func aheadQuantile(mu float64, batches []int, p float64, limit int) int {
	if !(mu > 0) || limit <= 0 {
		return 0
	}
	// f is the pushes' size distribution. A size over limit+1 counts as
	// limit+1: that it is over is all the quantile needs.
	top := limit + 1
	f := make([]float64, top+1)
	if len(batches) == 0 {
		f[1] = 1
	} else {
		for _, b := range batches {
			f[min(max(b, 1), top)]++
		}
		for k := range f {
			f[k] /= float64(len(batches))
		}
	}
	mean := 0.0
	for k, fk := range f {
		mean += float64(k) * fk
	}
	pushes := mu / mean
	if pushes > maxPushes {
		return limit
	}
	// y[j] = P(Y = j) = P(B > j)/E[B].
	y := make([]float64, top)
	above := 1.0
	for j := range y {
		above -= f[j]
		y[j] = above / mean
	}
	// x[n] = P(X = n), by Panjer's recursion for a compound Poisson sum:
	// x[0] = e^-ν, x[n] = ν/n · Σ k·f[k]·x[n-k].
	x := make([]float64, 0, limit+1)
	cdf := 0.0
	for n := 0; n <= limit; n++ {
		if n == 0 {
			x = append(x, math.Exp(-pushes))
		} else {
			v := 0.0
			for k := 1; k <= min(n, top); k++ {
				v += float64(k) * f[k] * x[n-k]
			}
			x = append(x, pushes/float64(n)*v)
		}
		for j := 0; j <= min(n, top-1); j++ {
			cdf += x[n-j] * y[j]
		}
		if cdf >= p {
			return n
		}
	}
	return limit
}

// perMinute shows a rate a second as a short number a minute.
func perMinute(perSecond float64) string {
	v := perSecond * 60
	switch {
	case v <= 0:
		return "0"
	case v >= 10:
		return strconv.FormatFloat(v, 'f', 0, 64)
	case v >= 0.1:
		return strconv.FormatFloat(v, 'f', 1, 64)
	default:
		return strconv.FormatFloat(v, 'g', 2, 64)
	}
}

// seconds shows a boot time: "58s", "119s", "2m30s", "5m".
func seconds(d time.Duration) string {
	d = d.Round(time.Second)
	if d < 2*time.Minute {
		return strconv.Itoa(int(d/time.Second)) + "s"
	}
	s := d.String()
	if strings.HasSuffix(s, "m0s") {
		s = strings.TrimSuffix(s, "0s")
	}
	return s
}
