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
// have taken all S+F instances: N ≥ S+F. By PASTA (Poisson arrivals see
// time averages) N is distributed as the arrivals in any window of length
// W: Poisson with mean λW, or, for CI's bursty arrivals (a push fans out to
// a matrix of jobs), negative binomial with the same mean and the variance
// D·λW, D being the index of dispersion of the per-minute counts. The share
// of requests waiting longer than T is then P(N ≥ S+F), and the smallest S
// with P(N ≤ S+F-1) ≥ p is
//
//	S = Q_p(N) + 1 - F.
//
// Consequences: when T ≥ B, W ≤ 0 and no request ever waits longer than T
// (at most a boot), so S = 0. Any demand at all asks for one spare
// (Q_p = 0, S = 1): with none, every request waits a whole boot.
//
// The quantile. p95 is over all of a pool's requests, not every moment's,
// and a spare kept through the night for the rare job costs more
// instance-hours than all the day's spares. So the pool spends part of the
// 5% where spares are dearest: when the current rate is at or below the
// QuietRate, the rate of the history's quietest stretches that together
// saw quietShare (2%) of the requests, it keeps no spares and those
// requests wait a boot. Everywhere else it sizes with p = 0.97; in all,
// at most 0.02 + 0.98·0.03 < 5% of requests wait longer than T.
//
// The TTD. An idle instance above the target costs its idle time; ending
// it and booting another when one is needed costs a boot (billed as much
// as idle time, and made to wait for besides). Keeping it for one boot time
// and ending it then is the classic rent-or-buy answer: whatever the next
// request's time, it never costs more than twice what a clairvoyant choice
// would (which is what the simulator's oracle does: it idles across a gap
// when the gap is shorter than a boot). The config's idle_ttd bounds it.
const (
	// quietShare is the share of requests, by the history, that may wait a
	// boot in the pool's quietest stretches.
	quietShare = 0.02
	// spareQuantile is the share of the other requests to be served within
	// the target wait.
	spareQuantile = 0.97
	// maxDispersion bounds the index of dispersion: a few huge bursts in a
	// short window must not ask for max_idle forever.
	maxDispersion = 50
	// exactBelow is the mean up to which quantiles are summed exactly; above
	// it, e^-mean underflows and the normal approximation is close anyway.
	exactBelow = 400
)

// AutoscaleInput is what the pool knows of its demand, the estimates in.
type AutoscaleInput struct {
	// RecentRate is lease requests a second over the last minutes;
	// HistoryRate, at this time of the day or week by the history (0: no
	// history yet). The pool plans for the higher: a morning's rush is
	// met before it shows in the recent rate.
	RecentRate  float64
	HistoryRate float64
	// QuietRate: a rate at or below it is of the history's quietest
	// stretches (see above); 0: not known yet.
	QuietRate float64
	// Dispersion is the variance over the mean of the per-minute request
	// counts (1 or less: Poisson).
	Dispersion float64
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
	IdleTTD    time.Duration
	// Rate is the request rate planned for, a second.
	Rate float64
	Boot time.Duration // the typical boot, as shown
	// Reason says why, for `hangar pools`: "rate 2.1/min, boot 58s".
	Reason string
}

// PlanningWindow is W = B - T: the requests of the last W before a request
// are those whose instances cannot be ready within T of it.
func PlanningWindow(bootP90, targetWait time.Duration) time.Duration {
	return max(bootP90-targetWait, 0)
}

// DecideAutoscale sizes the spares (see the model above).
func DecideAutoscale(in AutoscaleInput) (d AutoscaleDecision) {
	rate := max(in.RecentRate, in.HistoryRate, 0)
	d = AutoscaleDecision{Rate: rate, Boot: in.BootP50}
	d.IdleTTD = max(in.BootP50, time.Second)
	if in.IdleTTD > 0 {
		d.IdleTTD = min(d.IdleTTD, in.IdleTTD)
	}
	notes := []string{"rate " + perMinute(rate) + "/min", "boot " + seconds(in.BootP50)}
	defer func() { d.Reason = strings.Join(notes, ", ") }()

	w := PlanningWindow(in.BootP90, in.TargetWaitP95)
	switch {
	case rate <= 0:
		return d
	case w <= 0:
		notes = append(notes, "boot within target")
		return d
	case in.QuietRate > 0 && rate <= in.QuietRate:
		notes = append(notes, "quiet")
		return d
	}
	frees := math.Floor(max(in.ExpectedFrees, 0))
	s := arrivalsQuantile(rate*w.Seconds(), in.Dispersion, spareQuantile) + 1 - int(frees)
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

// arrivalsQuantile is the smallest k with P(N ≤ k) ≥ p, N counting the
// arrivals of a window: mean mu, variance dispersion·mu; Poisson for a
// dispersion of 1 or less, negative binomial above.
func arrivalsQuantile(mu, dispersion, p float64) int {
	if mu <= 0 || math.IsNaN(mu) {
		return 0
	}
	dispersion = min(max(dispersion, 1), maxDispersion)
	if math.IsNaN(dispersion) {
		dispersion = 1
	}
	if mu > exactBelow {
		k := math.Ceil(mu + normalQuantile(p)*math.Sqrt(dispersion*mu))
		return int(min(k, math.MaxInt32))
	}
	var pk float64       // P(N = k)
	var next func(k int) // moves pk from P(N = k-1) to P(N = k)
	if dispersion < 1+1e-9 {
		pk = math.Exp(-mu)
		next = func(k int) { pk *= mu / float64(k) }
	} else {
		// Successes r and success probability q with mean r(1-q)/q = mu
		// and variance mu/q = dispersion·mu.
		q := 1 / dispersion
		r := mu / (dispersion - 1)
		pk = math.Pow(q, r)
		next = func(k int) { pk *= (float64(k) - 1 + r) / float64(k) * (1 - q) }
	}
	cdf := pk
	k := 0
	// The tail is summed term by term; the bound only guards against a
	// rounding error keeping cdf a hair under p for ever.
	for cdf < p && k < 1_000_000 {
		k++
		next(k)
		cdf += pk
	}
	return k
}

// normalQuantile is the standard normal's p-quantile, by bisection on erf:
// called with a constant p, it needs no speed.
func normalQuantile(p float64) float64 {
	lo, hi := -10.0, 10.0
	for range 100 {
		mid := (lo + hi) / 2
		if 0.5*math.Erfc(-mid/math.Sqrt2) < p {
			lo = mid
		} else {
			hi = mid
		}
	}
	return (lo + hi) / 2
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
